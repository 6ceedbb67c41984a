//! The HTTP front: find and verify the refresh token of an `http::Request`, share whole
//! `http::Response`s, and answer refusals with JSON (or gRPC statuses).
//!
//! [`HttpExtract`] is the [`Extract`] strategy and [`HttpShare`] the [`Share`] policy;
//! [`RefreshCoalesceLayer::http`](crate::RefreshCoalesceLayer::http) puts them together.
//! The inner service receives `http::Request<RequestBody<B>>` and its responses reach callers
//! as `http::Response<ResponseBody<B>>`; axum, hyper and tonic services accept both.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use ::http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version,
    header::{
        CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
    },
};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use pin_project_lite::pin_project;

use crate::{
    error::{
        BoxError, BuildError, Elapsed, Failure, LeaderFailed, Overloaded, Rejected, Rejection,
    },
    key::{Admission, Extract, Extracted, Fingerprinter},
    share::{Served, Share},
    token::{
        DEFAULT_MAX_TOKEN_LEN, TokenSource, Verified, Verify,
        source::{self, BodyKind, Client, Credential},
    },
};

mod grant;

pub use self::grant::RefreshGrant;

/// The request body cap by default: 16 KiB.
pub const DEFAULT_BODY_LIMIT: usize = 16 * 1024;
/// The largest response shared by default: 64 KiB.
pub const DEFAULT_MAX_RESPONSE: usize = 64 * 1024;
/// The response header that reports how a caller was served, when enabled.
pub const COALESCED_HEADER: HeaderName = HeaderName::from_static("x-refresh-coalesced");

// ---------------------------------------------------------------------------------------
// Request side
// ---------------------------------------------------------------------------------------

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
            let invalid = |why| Rejected::new(Rejection::InvalidDpopProof(why));
            let mut proofs = parts.headers.get_all(DPOP).iter();
            let proof = proofs.next().expect("the header is present");
            if proofs.next().is_some() {
                return Err(invalid("more than one DPoP header"));
            }
            Ok(Sender::Proof(proof.as_bytes().to_vec()))
        }
    }
}

/// The `DPoP` request header (RFC 9449 §4.1).
const DPOP: HeaderName = HeaderName::from_static("dpop");

/// What a request's DPoP header binds it to.
enum Sender {
    None,
    /// A verified proof: its key's RFC 7638 thumbprint, raw and base64url.
    #[cfg(feature = "jwt")]
    Key([u8; 32], String),
    /// An unchecked proof, whole (without `jwt`, which checks proofs).
    #[cfg(not(feature = "jwt"))]
    Proof(Vec<u8>),
}

impl Sender {
    fn thumbprint(&self) -> Option<String> {
        match self {
            #[cfg(feature = "jwt")]
            Self::Key(_, b64) => Some(b64.clone()),
            _ => None,
        }
    }
}

/// The parts of a key besides the token: everything else the inner service authenticates,
/// each kind tagged so that no two kinds collide.
fn party<'a>(
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

fn admission(keys: &Fingerprinter, token: &str, verified: &Verified) -> Admission {
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

/// Reads at most `limit` bytes of `body`; `413` beyond.
async fn read_body<B>(body: B, headers: &HeaderMap, limit: usize) -> Result<Bytes, Rejected>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(Rejected::new(Rejection::BodyTooLarge));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(Rejected::new(Rejection::BodyTooLarge)),
        Err(_) => Err(Rejected::new(Rejection::Malformed(
            "request body could not be read",
        ))),
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

pin_project! {
    /// The request body the inner service receives: the bytes the layer read to find the
    /// token, or the original body, untouched, when no body source needed it.
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        Buffered { data: Option<Bytes> },
        Streaming { #[pin] body: B },
    }
}

impl<B> RequestBody<B> {
    /// A body of `bytes`, already read.
    pub fn buffered(bytes: Bytes) -> Self {
        Self {
            kind: RequestKind::Buffered {
                data: (!bytes.is_empty()).then_some(bytes),
            },
        }
    }

    /// The original body, streaming.
    pub fn streaming(body: B) -> Self {
        Self {
            kind: RequestKind::Streaming { body },
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            RequestKindProj::Buffered { data } => {
                Poll::Ready(data.take().map(|d| Ok(Frame::data(d))))
            }
            RequestKindProj::Streaming { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Buffered { data } => data.is_none(),
            RequestKind::Streaming { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestKind::Streaming { body } => body.size_hint(),
        }
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            RequestKind::Buffered { data } => f
                .debug_struct("RequestBody::Buffered")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
            RequestKind::Streaming { .. } => f.write_str("RequestBody::Streaming"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Response side
// ---------------------------------------------------------------------------------------

/// How refusals are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Protocol {
    /// JSON bodies `{"error": ..., "error_description": ...}` with an HTTP status, as RFC
    /// 6749 §5.2 does for token endpoints.
    #[default]
    Json,
    /// Trailers-only gRPC statuses (`grpc-status`, `grpc-message`), for tonic services.
    Grpc,
}

type ReplayIf = Arc<dyn Fn(StatusCode, &HeaderMap, Option<&HeaderMap>) -> bool + Send + Sync>;

/// Shares whole HTTP responses: buffers the inner response once (status, headers, body,
/// trailers) and rebuilds it byte-identical for every caller, `Set-Cookie` and
/// `Cache-Control` included.
///
/// - Only responses the replay predicate accepts become replays (default: a `2xx` status
///   and, where present, `grpc-status: 0`). Others reach their flight's callers only.
/// - A body over [`max_response`](Self::max_response) (64 KiB) is not shared: one caller
///   receives it streamed, the others `503`.
/// - An error of the inner service reaches one caller as itself (so hyper and tonic see it);
///   the flight's other callers get `503`.
/// - Refusals become JSON responses, or gRPC statuses with [`grpc`](Self::grpc).
#[derive(Clone)]
pub struct HttpShare {
    max_response: usize,
    replay_if: ReplayIf,
    report: bool,
    invalid_grant_status: StatusCode,
    protocol: Protocol,
}

impl HttpShare {
    /// The defaults: 64 KiB responses, `2xx` replayed, JSON refusals, `401 invalid_grant`.
    pub fn new() -> Self {
        Self {
            max_response: DEFAULT_MAX_RESPONSE,
            replay_if: Arc::new(default_replay_if),
            report: false,
            invalid_grant_status: StatusCode::UNAUTHORIZED,
            protocol: Protocol::Json,
        }
    }

    /// The largest response body that is shared and replayed. Default: 64 KiB.
    #[must_use]
    pub fn max_response(mut self, max: usize) -> Self {
        self.max_response = max;
        self
    }

    /// Which responses are replayed, from status, headers and trailers. Default: a `2xx`
    /// status and, where a `grpc-status` is present, `0`.
    #[must_use]
    pub fn replay_if(
        mut self,
        predicate: impl Fn(StatusCode, &HeaderMap, Option<&HeaderMap>) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.replay_if = Arc::new(predicate);
        self
    }

    /// Adds `x-refresh-coalesced: leader|joined|replayed` to shared responses. Default: off.
    #[must_use]
    pub fn report_coalescing(mut self, report: bool) -> Self {
        self.report = report;
        self
    }

    /// The status of `invalid_grant` refusals. Default: `401` (RFC 6749 §5.2 prefers `400`).
    #[must_use]
    pub fn invalid_grant_status(mut self, status: StatusCode) -> Self {
        self.invalid_grant_status = status;
        self
    }

    /// Writes refusals as trailers-only gRPC statuses, for a tonic server. Default: JSON.
    #[must_use]
    pub fn grpc(mut self) -> Self {
        self.protocol = Protocol::Grpc;
        self
    }

    /// Builds the refusal for one of the errors of [`error`](crate::error).
    pub fn refusal<B>(
        &self,
        error: &(dyn std::error::Error + 'static),
    ) -> Response<ResponseBody<B>> {
        let refusal = Refusal::of(error, self.invalid_grant_status);
        match self.protocol {
            Protocol::Json => refusal.json(),
            Protocol::Grpc => refusal.grpc(),
        }
    }
}

impl Default for HttpShare {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for HttpShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpShare")
            .field("max_response", &self.max_response)
            .field("report", &self.report)
            .field("invalid_grant_status", &self.invalid_grant_status)
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

fn default_replay_if(
    status: StatusCode,
    headers: &HeaderMap,
    trailers: Option<&HeaderMap>,
) -> bool {
    const GRPC_STATUS: &str = "grpc-status";
    let grpc_ok = trailers
        .and_then(|t| t.get(GRPC_STATUS))
        .or_else(|| headers.get(GRPC_STATUS))
        .is_none_or(|s| s == "0");
    status.is_success() && grpc_ok
}

/// Whether a response asks for a (new) DPoP nonce: an error carrying `DPoP-Nonce`.
fn is_nonce_challenge(status: StatusCode, headers: &HeaderMap) -> bool {
    !status.is_success() && headers.contains_key("dpop-nonce")
}

/// A response read to its end and kept compact, as it lives for the whole replay window:
/// headers and trailers packed in one allocation each, the body at its exact size.
struct Buffered {
    status: StatusCode,
    version: Version,
    headers: wire::Packed,
    body: Bytes,
    /// Boxed: only gRPC responses have trailers.
    trailers: Option<Box<wire::Packed>>,
    /// What the replay predicate said when the response was buffered.
    replayable: bool,
}

impl Buffered {
    /// Headers and body share one allocation of exactly their size.
    fn new(
        status: StatusCode,
        version: Version,
        headers: &HeaderMap,
        body: &[Bytes],
        trailers: Option<&HeaderMap>,
        replay_if: &ReplayIf,
    ) -> Self {
        let (packed, body) = wire::Packed::pack_with(headers, body);
        Self {
            status,
            version,
            headers: packed,
            body,
            trailers: trailers.map(|trailers| Box::new(wire::Packed::pack(trailers))),
            // RFC 9449 §8: a nonce challenge answers one proof; replaying it would hand a
            // stale nonce to the next one, whatever the policy says.
            replayable: replay_if(status, headers, trailers)
                && !is_nonce_challenge(status, headers),
        }
    }
}

/// One inner response, stored once and shared by every caller of its flight. Opaque.
pub struct SharedResponse<B, E> {
    kind: SharedKind<B, E>,
}

enum SharedKind<B, E> {
    Buffered(Buffered),
    /// Too large to share: the first caller to ask takes it.
    /// (Boxed, as the next variant: they are rare and large, and a replay lives long.)
    Streamed(Box<Mutex<Option<Response<ResponseBody<B>>>>>),
    /// The inner service failed: the first caller to ask takes the error.
    Failed(Box<Mutex<Option<E>>>),
    /// The response body failed while it was buffered.
    BodyFailed,
}

impl<B, E> fmt::Debug for SharedResponse<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            SharedKind::Buffered(buffered) => {
                return write!(f, "SharedResponse({})", buffered.status);
            }
            SharedKind::Streamed(_) => "streamed",
            SharedKind::Failed(_) => "failed",
            SharedKind::BodyFailed => "body failed",
        };
        write!(f, "SharedResponse({kind})")
    }
}

/// The future of [`HttpShare`]'s `share`: buffers the inner response.
pub struct ShareFuture<B, E> {
    inner: Pin<Box<dyn Future<Output = SharedResponse<B, E>> + Send>>,
}

impl<B, E> Future for ShareFuture<B, E> {
    type Output = SharedResponse<B, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<B, E> fmt::Debug for ShareFuture<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ShareFuture")
    }
}

impl<B, E> Share<Response<B>, E> for HttpShare
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    E: Send + 'static,
{
    type Value = SharedResponse<B, E>;
    type Response = Response<ResponseBody<B>>;
    type Error = E;
    type Future = ShareFuture<B, E>;

    fn share(&self, result: Result<Response<B>, E>) -> Self::Future {
        let max = self.max_response;
        let replay_if = self.replay_if.clone();
        ShareFuture {
            inner: Box::pin(async move {
                let kind = match result {
                    Ok(response) => buffer(response, max, &replay_if).await,
                    Err(error) => SharedKind::Failed(Box::new(Mutex::new(Some(error)))),
                };
                SharedResponse { kind }
            }),
        }
    }

    fn is_replayable(&self, value: &Self::Value) -> bool {
        matches!(&value.kind, SharedKind::Buffered(buffered) if buffered.replayable)
    }

    fn respond(&self, value: &Self::Value, served: Served) -> Result<Self::Response, E> {
        let mut response = match &value.kind {
            SharedKind::Buffered(buffered) => {
                let trailers = buffered.trailers.as_ref().map(|trailers| trailers.unpack());
                let mut response =
                    Response::new(ResponseBody::full(buffered.body.clone(), trailers));
                *response.status_mut() = buffered.status;
                *response.version_mut() = buffered.version;
                *response.headers_mut() = buffered.headers.unpack();
                response
            }
            SharedKind::Streamed(slot) => match take(slot) {
                Some(response) => response,
                None => return Ok(self.refusal(&Unshareable)),
            },
            SharedKind::Failed(slot) => match take(slot) {
                Some(error) => return Err(error),
                None => return Ok(self.refusal(&Unshareable)),
            },
            SharedKind::BodyFailed => return Ok(self.refusal(&Unshareable)),
        };
        if self.report {
            response
                .headers_mut()
                .insert(COALESCED_HEADER, HeaderValue::from_static(served.as_str()));
        }
        Ok(response)
    }

    fn reject(&self, error: BoxError) -> Result<Self::Response, E> {
        Ok(self.refusal(&*error))
    }

    fn pass(&self, result: Result<Response<B>, E>) -> Result<Self::Response, E> {
        result.map(|response| response.map(ResponseBody::streaming))
    }

    fn ready_error(&self, error: E) -> E {
        error
    }

    fn encode(&self, value: &Self::Value) -> Option<Vec<u8>> {
        match &value.kind {
            SharedKind::Buffered(buffered) => Some(wire::encode(buffered)),
            // Too large, or an error of the inner service: nothing another instance can use.
            _ => None,
        }
    }

    fn decode(&self, bytes: &[u8]) -> Option<Self::Value> {
        let (status, version, headers, body, trailers) = wire::decode(bytes)?;
        let buffered = Buffered::new(
            status,
            version,
            &headers,
            &[body],
            trailers.as_ref(),
            &self.replay_if,
        );
        Some(SharedResponse {
            kind: SharedKind::Buffered(buffered),
        })
    }
}

/// The stored form of a buffered response, for other instances: a version byte, then
/// status, HTTP version, headers, body and trailers, each length-prefixed. The bytes are
/// sealed by the store; decoding still checks every length and refuses anything left over.
mod wire {
    use ::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};
    use bytes::Bytes;

    const FORMAT: u8 = 1;

    fn version_code(version: Version) -> u8 {
        match version {
            Version::HTTP_09 => 0,
            Version::HTTP_10 => 1,
            Version::HTTP_2 => 3,
            Version::HTTP_3 => 4,
            _ => 2,
        }
    }

    fn code_version(code: u8) -> Option<Version> {
        Some(match code {
            0 => Version::HTTP_09,
            1 => Version::HTTP_10,
            2 => Version::HTTP_11,
            3 => Version::HTTP_2,
            4 => Version::HTTP_3,
            _ => return None,
        })
    }

    fn put(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
    }

    fn put_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
        out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (name, value) in headers {
            put(out, name.as_str().as_bytes());
            put(out, value.as_bytes());
        }
    }

    /// Headers packed in one allocation: their count, then each name and value
    /// length-prefixed (the layout of [`encode`]'s header sections).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub(super) struct Packed(Bytes);

    impl Packed {
        pub(super) fn pack(headers: &HeaderMap) -> Self {
            Self::pack_with(headers, &[]).0
        }

        /// Packs `headers` and appends `tail` in the same allocation, of exactly their
        /// size; returns the packed headers and the tail, which share it.
        pub(super) fn pack_with(headers: &HeaderMap, tail: &[Bytes]) -> (Self, Bytes) {
            let len = headers
                .iter()
                .map(|(name, value)| 8 + name.as_str().len() + value.len())
                .sum::<usize>();
            let tail_len = tail.iter().map(Bytes::len).sum::<usize>();
            let mut out = Vec::with_capacity(4 + len + tail_len);
            put_headers(&mut out, headers);
            let split = out.len();
            for chunk in tail {
                out.extend_from_slice(chunk);
            }
            let all = Bytes::from(out);
            (Self(all.slice(..split)), all.slice(split..))
        }

        /// The headers again. Values share the packed bytes; nothing is copied but names
        /// outside the standard set.
        pub(super) fn unpack(&self) -> HeaderMap {
            self.try_unpack().unwrap_or_default()
        }

        fn try_unpack(&self) -> Option<HeaderMap> {
            let mut reader = Reader(&self.0);
            let count = reader.u32()?;
            let mut headers = HeaderMap::with_capacity(count);
            for _ in 0..count {
                let name = HeaderName::from_bytes(reader.chunk()?).ok()?;
                let value =
                    HeaderValue::from_maybe_shared(self.0.slice_ref(reader.chunk()?)).ok()?;
                headers.append(name, value);
            }
            Some(headers)
        }
    }

    pub(super) fn encode(buffered: &super::Buffered) -> Vec<u8> {
        let trailers = buffered.trailers.as_ref().map_or(0, |t| t.0.len());
        let mut out =
            Vec::with_capacity(16 + buffered.headers.0.len() + buffered.body.len() + trailers);
        out.push(FORMAT);
        out.extend_from_slice(&buffered.status.as_u16().to_be_bytes());
        out.push(version_code(buffered.version));
        out.extend_from_slice(&buffered.headers.0);
        put(&mut out, &buffered.body);
        match &buffered.trailers {
            Some(trailers) => {
                out.push(1);
                out.extend_from_slice(&trailers.0);
            }
            None => out.push(0),
        }
        out
    }

    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Some(head)
        }

        fn byte(&mut self) -> Option<u8> {
            Some(self.take(1)?[0])
        }

        fn u32(&mut self) -> Option<usize> {
            let bytes: [u8; 4] = self.take(4)?.try_into().ok()?;
            usize::try_from(u32::from_be_bytes(bytes)).ok()
        }

        fn chunk(&mut self) -> Option<&'a [u8]> {
            let len = self.u32()?;
            self.take(len)
        }

        fn headers(&mut self) -> Option<HeaderMap> {
            let count = self.u32()?;
            // Every entry takes at least 8 bytes: a hostile count cannot allocate much.
            let mut headers = HeaderMap::with_capacity(count.min(self.0.len() / 8));
            for _ in 0..count {
                let name = HeaderName::from_bytes(self.chunk()?).ok()?;
                let value = HeaderValue::from_bytes(self.chunk()?).ok()?;
                headers.append(name, value);
            }
            Some(headers)
        }
    }

    type Decoded = (StatusCode, Version, HeaderMap, Bytes, Option<HeaderMap>);

    pub(super) fn decode(bytes: &[u8]) -> Option<Decoded> {
        let mut reader = Reader(bytes);
        if reader.byte()? != FORMAT {
            return None;
        }
        let status = u16::from_be_bytes(reader.take(2)?.try_into().ok()?);
        let status = StatusCode::from_u16(status).ok()?;
        let version = code_version(reader.byte()?)?;
        let headers = reader.headers()?;
        let body = Bytes::copy_from_slice(reader.chunk()?);
        let trailers = match reader.byte()? {
            0 => None,
            1 => Some(reader.headers()?),
            _ => return None,
        };
        reader
            .0
            .is_empty()
            .then_some((status, version, headers, body, trailers))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_response_survives_the_round_trip_with_repeated_headers_and_trailers() {
            let mut headers = HeaderMap::new();
            headers.append("set-cookie", HeaderValue::from_static("a=1"));
            headers.append("set-cookie", HeaderValue::from_static("b=2"));
            headers.append("cache-control", HeaderValue::from_static("no-store"));
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            let body = Bytes::from_static(b"{\"refresh_token\":\"r2\"}");
            let replay_if: super::super::ReplayIf =
                std::sync::Arc::new(super::super::default_replay_if);
            let buffered = super::super::Buffered::new(
                StatusCode::OK,
                Version::HTTP_2,
                &headers,
                std::slice::from_ref(&body),
                Some(&trailers),
                &replay_if,
            );
            assert!(buffered.replayable);
            assert_eq!(
                buffered.headers.unpack(),
                headers,
                "packed headers unpack as they were"
            );
            let bytes = encode(&buffered);
            let decoded = decode(&bytes).expect("decodes");
            assert_eq!(
                decoded,
                (
                    StatusCode::OK,
                    Version::HTTP_2,
                    headers,
                    body,
                    Some(trailers)
                )
            );
            for cut in 0..bytes.len() {
                assert_eq!(decode(&bytes[..cut]), None, "truncated at {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(decode(&longer), None, "trailing bytes");
        }
    }
}

fn take<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// Buffers `response` if its body fits in `max` bytes; otherwise keeps it for one caller,
/// with whatever was read already in front of the rest.
async fn buffer<B, E>(response: Response<B>, max: usize, replay_if: &ReplayIf) -> SharedKind<B, E>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (parts, body) = response.into_parts();
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        let response = Response::from_parts(parts, ResponseBody::streaming(body));
        return SharedKind::Streamed(Box::new(Mutex::new(Some(response))));
    }
    let mut body = Box::pin(body);
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0;
    let mut trailers: Option<HeaderMap> = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            tracing::warn!("inner response body failed while it was buffered");
            return SharedKind::BodyFailed;
        };
        match frame.into_data() {
            Ok(chunk) => {
                len += chunk.len();
                chunks.push(chunk);
                if len > max {
                    let rest = ResponseBody::rest(concat(chunks, len), body);
                    let response = Response::from_parts(parts, rest);
                    return SharedKind::Streamed(Box::new(Mutex::new(Some(response))));
                }
            }
            Err(frame) => {
                if let Ok(more) = frame.into_trailers() {
                    trailers.get_or_insert_with(HeaderMap::new).extend(more);
                }
            }
        }
    }
    SharedKind::Buffered(Buffered::new(
        parts.status,
        parts.version,
        &parts.headers,
        &chunks,
        trailers.as_ref(),
        replay_if,
    ))
}

/// The chunks of a body as one `Bytes` of exactly `len` bytes (a single chunk as it is).
fn concat(mut chunks: Vec<Bytes>, len: usize) -> Bytes {
    if chunks.len() == 1 {
        return chunks.pop().unwrap_or_default();
    }
    let mut joined = Vec::with_capacity(len);
    for chunk in chunks {
        joined.extend_from_slice(&chunk);
    }
    Bytes::from(joined)
}

/// The stand-in error for callers of a flight whose response could not be shared.
#[derive(Debug)]
struct Unshareable;

impl fmt::Display for Unshareable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the refresh response could not be shared")
    }
}

impl std::error::Error for Unshareable {}

/// The OAuth error code of a refused DPoP proof (RFC 9449 §5).
const INVALID_DPOP_PROOF: &str = "invalid_dpop_proof";

/// A refusal, before it is written as JSON or as a gRPC status.
struct Refusal {
    status: StatusCode,
    error: &'static str,
    description: String,
    retry_after: bool,
    grpc: u8,
    /// Sent before the request body was read: close the HTTP/1 connection.
    closes: bool,
}

impl Refusal {
    fn of(error: &(dyn std::error::Error + 'static), invalid_grant: StatusCode) -> Self {
        const INVALID_ARGUMENT: u8 = 3;
        const RESOURCE_EXHAUSTED: u8 = 8;
        const UNAVAILABLE: u8 = 14;
        const UNAUTHENTICATED: u8 = 16;
        let description = error.to_string();
        let refusal = |status, error, retry_after, grpc| Refusal {
            status,
            error,
            description: description.clone(),
            retry_after,
            grpc,
            closes: false,
        };
        if let Some(rejected) = error.downcast_ref::<Rejected>() {
            let refusal = |status, error, retry_after, grpc| Refusal {
                closes: rejected.closes_connection(),
                ..refusal(status, error, retry_after, grpc)
            };
            return match rejected.rejection() {
                Rejection::MissingToken => refusal(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    false,
                    UNAUTHENTICATED,
                ),
                Rejection::BodyTooLarge => refusal(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request",
                    false,
                    RESOURCE_EXHAUSTED,
                ),
                Rejection::InvalidToken(_) | Rejection::Expired => {
                    refusal(invalid_grant, "invalid_grant", false, UNAUTHENTICATED)
                }
                Rejection::InvalidDpopProof(_) => refusal(
                    StatusCode::BAD_REQUEST,
                    INVALID_DPOP_PROOF,
                    false,
                    UNAUTHENTICATED,
                ),
                // Like `Overloaded`: a bounded cache is full, a retry soon may pass.
                Rejection::Unavailable(_) => refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    true,
                    RESOURCE_EXHAUSTED,
                ),
                _ => refusal(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    false,
                    INVALID_ARGUMENT,
                ),
            };
        }
        // The flight was invalidated (logout, password change) while it ran: its result is
        // revoked, which to its callers is what the token server would say of the token.
        if error
            .downcast_ref::<LeaderFailed>()
            .is_some_and(|failed| failed.failure() == Failure::Revoked)
        {
            return refusal(invalid_grant, "invalid_grant", false, UNAUTHENTICATED);
        }
        // A follower's flight gave up on another instance's leader: to its callers, that is
        // the wait timing out, whenever they joined.
        let remote_timeout = error
            .downcast_ref::<LeaderFailed>()
            .is_some_and(|failed| failed.failure() == Failure::RemoteTimeout);
        if error.is::<Elapsed>() || remote_timeout {
            return refusal(
                StatusCode::TOO_MANY_REQUESTS,
                "temporarily_unavailable",
                true,
                UNAVAILABLE,
            );
        }
        if error.is::<Overloaded>() {
            return refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                true,
                RESOURCE_EXHAUSTED,
            );
        }
        if !error.is::<LeaderFailed>() && !error.is::<Unshareable>() {
            tracing::error!(error = %description, "unexpected error in the coalescing layer");
        }
        refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            true,
            UNAVAILABLE,
        )
    }

    fn json<B>(self) -> Response<ResponseBody<B>> {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            error: &'a str,
            error_description: &'a str,
        }
        let body = serde_json::to_vec(&Body {
            error: self.error,
            error_description: &self.description,
        })
        .expect("a struct of strings serializes");
        let mut response = Response::new(ResponseBody::full(Bytes::from(body), None));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.closes {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if self.error == INVALID_DPOP_PROOF {
            // RFC 9449 §7.1's challenge, so that a client can tell a DPoP failure apart.
            headers.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"DPoP error="invalid_dpop_proof""#),
            );
        } else if self.status == StatusCode::UNAUTHORIZED {
            // RFC 7235 §3.1: a 401 carries a challenge; RFC 6750 §3 gives its form.
            headers.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer error="invalid_token""#),
            );
        }
        response
    }

    fn grpc<B>(self) -> Response<ResponseBody<B>> {
        // Trailers-only: the status travels in the headers and the body is empty.
        let mut response = Response::new(ResponseBody::full(Bytes::new(), None));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from(u16::from(self.grpc)));
        // grpc-message is percent-encoded; our descriptions are printable ASCII without '%'.
        if let Ok(message) = HeaderValue::from_str(&self.description) {
            headers.insert("grpc-message", message);
        }
        response
    }
}

pin_project! {
    /// The body of every response of the HTTP front: a shared, buffered body (with its
    /// trailers), a refusal, or the inner body streaming through.
    pub struct ResponseBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B> {
        Full { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Streaming { #[pin] body: B },
        Rest { prefix: Option<Bytes>, body: Pin<Box<B>> },
    }
}

impl<B> ResponseBody<B> {
    /// A complete body: `data`, then `trailers` if any.
    pub fn full(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: ResponseKind::Full {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    /// The inner body, streaming through.
    pub fn streaming(body: B) -> Self {
        Self {
            kind: ResponseKind::Streaming { body },
        }
    }

    fn rest(prefix: Bytes, body: Pin<Box<B>>) -> Self {
        Self {
            kind: ResponseKind::Rest {
                prefix: Some(prefix),
                body,
            },
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            ResponseKindProj::Full { data, trailers } => Poll::Ready(
                data.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            ResponseKindProj::Streaming { body } => body.poll_frame(cx).map_err(Into::into),
            ResponseKindProj::Rest { prefix, body } => match prefix.take() {
                Some(prefix) => Poll::Ready(Some(Ok(Frame::data(prefix)))),
                None => body.as_mut().poll_frame(cx).map_err(Into::into),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            ResponseKind::Streaming { body } => body.is_end_stream(),
            ResponseKind::Rest { prefix, body } => prefix.is_none() && body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Full { data, trailers } => {
                let len = data.as_ref().map_or(0, |d| d.len() as u64);
                if trailers.is_some() {
                    // Not exact: HTTP/1 drops the trailers of a body sent with a length.
                    let mut hint = SizeHint::new();
                    hint.set_lower(len);
                    hint
                } else {
                    SizeHint::with_exact(len)
                }
            }
            ResponseKind::Streaming { body } => body.size_hint(),
            ResponseKind::Rest { prefix, body } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let inner = body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ResponseKind::Full { data, trailers } => f
                .debug_struct("ResponseBody::Full")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .field("trailers", &trailers.is_some())
                .finish(),
            ResponseKind::Streaming { .. } => f.write_str("ResponseBody::Streaming"),
            ResponseKind::Rest { .. } => f.write_str("ResponseBody::Rest"),
        }
    }
}

#[cfg(test)]
mod refusal_tests {
    use super::*;

    fn refusal(rejection: Rejection) -> Refusal {
        let error = Rejected::new(rejection);
        Refusal::of(&error, StatusCode::UNAUTHORIZED)
    }

    #[test]
    fn an_invalid_dpop_proof_is_a_400_with_a_dpop_challenge() {
        let refusal = refusal(Rejection::InvalidDpopProof("wrong typ"));
        assert_eq!(refusal.grpc, 16);
        let response = refusal.json::<()>();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            response.headers()[WWW_AUTHENTICATE],
            r#"DPoP error="invalid_dpop_proof""#
        );
    }

    #[test]
    fn a_full_dpop_replay_cache_is_a_503_to_retry() {
        let refusal = refusal(Rejection::Unavailable("dpop replay cache is full"));
        assert_eq!(refusal.error, "temporarily_unavailable");
        let response = refusal.json::<()>();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
        assert!(response.headers().get(WWW_AUTHENTICATE).is_none());
    }

    #[test]
    fn a_revoked_flight_is_refused_as_invalid_grant_and_unauthenticated() {
        let revoked = LeaderFailed::new(Failure::Revoked);
        let refusal = Refusal::of(&revoked, StatusCode::UNAUTHORIZED);
        assert_eq!(refusal.status, StatusCode::UNAUTHORIZED);
        assert_eq!(refusal.error, "invalid_grant");
        assert_eq!(refusal.grpc, 16, "UNAUTHENTICATED");
        assert!(!refusal.retry_after);
        assert_eq!(
            refusal.description,
            "coalesced call was revoked by an invalidation while it ran"
        );
        let configured = Refusal::of(&revoked, StatusCode::BAD_REQUEST);
        assert_eq!(
            configured.status,
            StatusCode::BAD_REQUEST,
            "the configured status"
        );
    }
}
