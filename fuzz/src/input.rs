//! The fuzzers' input types, decoded from raw bytes with `arbitrary` (derive), and the
//! inverse encoding that `make_seeds` uses to write seed files.
//!
//! Decoding is `T::arbitrary(&mut Unstructured::new(bytes))` (not `arbitrary_take_rest`),
//! so the layout is simple and stable for `arbitrary` 1.x:
//!
//! - integers: little-endian, zero-padded when the input runs out;
//! - `bool`: one byte, odd is `true`; `Option<T>`: a `bool`, then `T` if `true`;
//! - enums: a `u32` `x` selects variant `(x * count) >> 32`;
//! - `Vec<T>`: for each element a `true` byte then the element, and a `false` byte;
//! - [`Blob`]: a `u16` length, then that many bytes (fewer if the input ends).
//!
//! [`Encode`] writes exactly that layout; the round-trip test in `tests` checks it against
//! the `arbitrary` version in `Cargo.lock`.

use arbitrary::{Arbitrary, Unstructured};

/// Bytes with a length prefix read from the front (unlike `Vec<u8>`, whose `arbitrary`
/// length comes from the end of the input and cannot be written by a simple encoder).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blob({:?})", String::from_utf8_lossy(&self.0))
    }
}

impl<'a> Arbitrary<'a> for Blob {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let len = usize::from(u16::arbitrary(u)?);
        let len = len.min(u.len());
        Ok(Blob(u.bytes(len)?.to_vec()))
    }
}

impl Blob {
    pub fn from(bytes: impl AsRef<[u8]>) -> Self {
        Blob(bytes.as_ref().to_vec())
    }

    /// The bytes, at most `max` of them.
    pub fn capped(&self, max: usize) -> &[u8] {
        &self.0[..self.0.len().min(max)]
    }
}

// ---------------------------------------------------------------------------------------
// The front target
// ---------------------------------------------------------------------------------------

/// One run of the `front` target: a fresh layer, then batches of requests.
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub struct FrontInput {
    pub config: Config,
    /// What the inner service answers, call by call (cycled; empty: always `Ok`).
    pub inner: Vec<InnerReply>,
    /// Run one after the other; the requests of one batch run concurrently.
    pub batches: Vec<Batch>,
}

/// Layer settings within small bounds, so that limits are actually reached.
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub struct Config {
    /// `max_entries` = 1 + this % 8.
    pub max_entries: u8,
    /// `max_waiters` = 1 + this % 8.
    pub max_waiters: u8,
    /// `max_replays` = this % 4 if `Some`.
    pub max_replays: Option<u8>,
    /// Refusals as gRPC statuses instead of JSON.
    pub grpc: bool,
    /// `x-refresh-coalesced` on shared responses.
    pub report: bool,
}

impl Config {
    /// The widest limits (8 entries, 8 waiters), no replay limit, JSON refusals, no report:
    /// what the seeds and the token target's extraction use.
    pub fn roomy() -> Self {
        Self {
            max_entries: 7,
            max_waiters: 7,
            max_replays: None,
            grpc: false,
            report: false,
        }
    }
}

/// One answer of the inner service.
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum InnerReply {
    /// `200` with a new pair after `delay` ms (of the paused clock).
    Ok { delay: u16 },
    /// `400 invalid_grant`, as the identity server says for a revoked token.
    Refused,
    /// An error of the inner service (one caller gets it as `Err`, the others `503`).
    Fail,
    /// A `200` over the 64 KiB share cap: streamed to one caller, `503` to the others.
    Large,
    /// Longer than the hard cap: aborted, `503` for everyone.
    Hang,
    /// A response shaped by the fuzzer: status, version, headers, body, trailers, frames.
    Custom(CustomReply),
}

/// A fuzzer-shaped response of the inner service. It always carries the harness's own
/// `x-inner-call`; fuzzer headers of that name (or `x-refresh-coalesced`) are dropped.
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub struct CustomReply {
    pub status: StatusChoice,
    /// 0: HTTP/0.9, 1: HTTP/1.0, 2: HTTP/1.1, 3: HTTP/2, 4: HTTP/3 (modulo 5).
    pub version: u8,
    pub delay: u16,
    pub headers: Vec<(ResponseHeaderName, Blob)>,
    pub body: Blob,
    /// Body frames of this many bytes (0: one frame).
    pub chunk: u8,
    pub trailers: Option<Vec<(ResponseHeaderName, Blob)>>,
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum StatusChoice {
    Ok,
    BadRequest,
    Unauthorized,
    Unavailable,
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum ResponseHeaderName {
    GrpcStatus,
    SetCookie,
    CacheControl,
    ContentLength,
    ContentType,
    Raw(Blob),
}

/// Requests that run concurrently, after the clock moved `advance` ms.
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub struct Batch {
    pub advance: u16,
    pub invalidate: Option<Invalidate>,
    pub requests: Vec<Req>,
}

/// A handle call before the batch.
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum Invalidate {
    Token(TokenChoice),
    Subject(Blob),
    Alice,
}

/// One HTTP request.
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub struct Req {
    pub method: MethodChoice,
    pub path: PathChoice,
    pub headers: Vec<HeaderChoice>,
    pub body: BodyChoice,
    /// Client authentication, in `Authorization: Basic` or the body's parameters. Last, and
    /// optional, so that inputs written before it decode as they did.
    pub client: Option<ClientAuth>,
    /// A `DPoP` header (RFC 9449).
    pub dpop: Option<DpopChoice>,
}

/// How the client authenticates (RFC 6749 §2.3, RFC 7523 §2.2).
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub struct ClientAuth {
    pub id: Option<ClientIdChoice>,
    pub credential: CredentialChoice,
    /// `Authorization: Basic id:secret` (form-encoded, an empty secret without one; an
    /// assertion still goes to the body); otherwise the body's parameters (`client_id`,
    /// `client_secret`, `client_assertion_type`, `client_assertion`, in a form or a JSON
    /// object, whichever the body is; none in another body).
    pub basic: bool,
    /// A second credential among the body's parameters: a second method, refused even if
    /// it is the same secret.
    pub also: Option<CredentialChoice>,
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum ClientIdChoice {
    /// `app-a`.
    A,
    /// `app b` (a space: form-encoded in Basic).
    B,
    Raw(Blob),
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum CredentialChoice {
    None,
    Secret(SecretChoice),
    Assertion(AssertionChoice),
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum SecretChoice {
    /// `s3cret`.
    One,
    /// `other:secret` (a colon: form-encoded in Basic).
    Two,
    Empty,
    Raw(Blob),
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum AssertionChoice {
    /// A fixed JWT-bearer assertion.
    A,
    /// Another one.
    B,
    /// `client_assertion` without `client_assertion_type` (refused).
    WithoutType,
    Raw {
        kind: Blob,
        assertion: Blob,
    },
}

/// A request's `DPoP` header.
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum DpopChoice {
    /// A fresh proof of the key for this request's method and URI.
    Valid(KeyChoice),
    /// A proof of the key that `fault` makes invalid.
    Corrupt { key: KeyChoice, fault: DpopFault },
    /// The very proof of an earlier request of the run (`n` back from the last valid proof
    /// made; none if there is none yet): a replay, refused unless the earlier one was never
    /// checked.
    Replay(u8),
    /// Two `DPoP` headers, each a fresh valid proof (refused).
    Twice(KeyChoice),
    /// Any bytes.
    Raw(Blob),
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum KeyChoice {
    /// ES256 (P-256).
    A,
    /// EdDSA (Ed25519).
    B,
}

/// What makes a proof invalid, certainly.
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum DpopFault {
    Signature,
    Method,
    Htu,
    OtherOrigin,
    OldIat,
    FutureIat,
    Typ,
    AlgNone,
    NoJti,
    EmptyJti,
    /// Signed by the key, the header naming the other key.
    OtherJwk,
    /// The header's jwk carries `d`.
    PrivateJwk,
    NoJwk,
    Truncated,
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum MethodChoice {
    Post,
    Get,
    Put,
    Raw(Blob),
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum PathChoice {
    /// `/auth/refresh`, a configured path.
    Refresh,
    /// `/auth.v1.TokenService/Refresh`, the other configured path.
    Grpc,
    /// `/auth/refresh?` + query.
    RefreshQuery(Blob),
    /// `https://id.example/auth/refresh` (absolute form).
    Absolute,
    /// `/auth/refresh/`: not a configured path.
    TrailingSlash,
    /// `/other`.
    Other,
    /// Any URI the bytes make, `/auth/refresh` if none.
    Raw(Blob),
}

/// Where a token comes from.
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum TokenChoice {
    /// A valid refresh token of `alice`, minted once per process.
    Valid,
    /// A second valid refresh token, of `bob`.
    Valid2,
    /// A refresh token that expired an hour ago.
    Expired,
    /// An access token (`typ: at+jwt`) signed with the same key.
    Access,
    /// The valid token, changed at one place.
    Mutated { at: u16, op: Mutation, bytes: Blob },
    /// Arbitrary bytes.
    Raw(Blob),
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum Mutation {
    Overwrite,
    Insert,
    /// Removes `bytes.len()` bytes.
    Delete,
    /// Truncates at `at`.
    Truncate,
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum HeaderChoice {
    Authorization(AuthChoice),
    Cookie(CookieChoice),
    ContentType(ContentTypeChoice),
    ContentLength(LengthChoice),
    /// The gRPC metadata source, `x-refresh-token`.
    Metadata {
        bearer: bool,
        token: TokenChoice,
    },
    /// A header from a small vocabulary of names, with any value.
    Raw {
        name: NameChoice,
        value: Blob,
    },
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum AuthChoice {
    Bearer(TokenChoice),
    /// `bearer` in another case, or with several spaces.
    BearerOddly {
        lower: bool,
        spaces: u8,
        token: TokenChoice,
    },
    /// `Basic base64(user:password)`.
    Basic {
        user: Blob,
        password: Blob,
    },
    /// `Basic` and any bytes.
    BasicRaw(Blob),
    /// Any bytes.
    Garbage(Blob),
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum CookieChoice {
    /// `refresh_token=<token>`.
    Token(TokenChoice),
    /// `theme=dark; refresh_token=<token>; lang=en`.
    Among(TokenChoice),
    /// Any bytes.
    Raw(Blob),
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum ContentTypeChoice {
    Json,
    JsonCharset,
    PlusJson,
    Form,
    FormCharset,
    Text,
    Raw(Blob),
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum LengthChoice {
    /// The body's real length.
    Actual,
    Number(u32),
    Raw(Blob),
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum NameChoice {
    Authorization,
    Cookie,
    ContentType,
    ContentLength,
    RefreshToken,
    GrpcStatus,
    Other,
}

/// The request body. Every body is capped at [`MAX_BODY`] bytes.
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum BodyChoice {
    Empty,
    /// `{"refresh_token": <token>, ...}`, with a `pad` field of `pad` bytes and `extra` JSON
    /// members spliced in before the closing brace.
    Json {
        token: Option<TokenChoice>,
        pad: u16,
        extra: Blob,
    },
    /// An RFC 6749 form.
    Form {
        grant: GrantChoice,
        token: Option<TokenChoice>,
        client: Option<Blob>,
        extra: Blob,
    },
    /// Any bytes.
    Raw(Blob),
    /// `unit` repeated `count` times.
    Repeat {
        unit: Blob,
        count: u16,
    },
    /// The bytes of `body`, sent in frames of `chunk` bytes.
    Chunked {
        chunk: u8,
        body: Box<BodyChoice>,
    },
    /// The bytes of `body`, then a body error.
    Failing {
        body: Box<BodyChoice>,
    },
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum GrantChoice {
    Refresh,
    AuthorizationCode,
    Raw(Blob),
}

/// The most request-body bytes the fuzzer sends (the layer's limit is 16 KiB).
pub const MAX_BODY: usize = 20 * 1024;

// ---------------------------------------------------------------------------------------
// The token target
// ---------------------------------------------------------------------------------------

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum TokenInput {
    /// `JwtVerifier::verify` of arbitrary bytes (lossy UTF-8).
    Verify(Blob),
    /// `verify` of a chosen token (the valid one mutated, say), padded with `pad` bytes.
    Choice { token: TokenChoice, pad: u16 },
    /// Header and payload JSON bytes, base64url-encoded and signed with the secret.
    SignJson { header: Blob, payload: Blob },
    /// Header and payload segments as given (not encoded), signed with the secret.
    SignSegments { header: Blob, payload: Blob },
    /// Structured claims, serialized to JSON and signed with the secret.
    Claims(ClaimsSpec),
    /// One request through a layer with the `Opaque` verifier (every well-formed token
    /// reaches the inner service) and every token source.
    Extract(Req),
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub struct ClaimsSpec {
    pub alg: AlgChoice,
    pub typ: TypChoice,
    pub crit: Option<ValueChoice>,
    pub sub: Option<ValueChoice>,
    pub exp: Option<ValueChoice>,
    pub nbf: Option<ValueChoice>,
    /// Repeats one claim (by index into the members written) under an equal name.
    pub duplicate: Option<DuplicateChoice>,
    pub extra: Vec<(Blob, ValueChoice)>,
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum AlgChoice {
    Hs256,
    Hs384,
    None,
    Raw(Blob),
    Missing,
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum TypChoice {
    Refresh,
    ApplicationRefresh,
    Upper,
    Access,
    Jwt,
    Raw(Blob),
    Missing,
}

#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum DuplicateChoice {
    /// `"sub"` twice.
    Plain(u8),
    /// The second name written with a `\u00XX` escape.
    Escaped(u8),
}

/// A JSON value for a claim.
#[derive(Arbitrary, Debug, Clone, PartialEq)]
pub enum ValueChoice {
    /// Seconds from now (signed).
    FromNow(i32),
    /// As a float with a fraction.
    FromNowFloat(i32),
    Int(i64),
    Float(u64),
    Str(Blob),
    Bool(bool),
    Null,
    Array,
    Object,
    /// Raw JSON text (possibly invalid).
    Raw(Blob),
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

/// Writes a value in the layout `arbitrary` decodes it from.
pub trait Encode {
    fn encode(&self, out: &mut Vec<u8>);

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }
}

/// The `u32` that makes a derived `arbitrary` pick variant `index` of `count`.
fn variant(out: &mut Vec<u8>, index: u64, count: u64) {
    let x = (index << 32).div_ceil(count);
    out.extend_from_slice(&(x as u32).to_le_bytes());
}

macro_rules! encode_int {
    ($($t:ty),*) => {$(
        impl Encode for $t {
            fn encode(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
encode_int!(u8, u16, u32, u64, i32, i64);

impl Encode for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl<T: Encode> Encode for Option<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Some(value) => {
                out.push(1);
                value.encode(out);
            }
            None => out.push(0),
        }
    }
}

impl<T: Encode> Encode for Vec<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        for item in self {
            out.push(1);
            item.encode(out);
        }
        out.push(0);
    }
}

impl<T: Encode> Encode for Box<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        (**self).encode(out);
    }
}

impl<A: Encode, B: Encode> Encode for (A, B) {
    fn encode(&self, out: &mut Vec<u8>) {
        self.0.encode(out);
        self.1.encode(out);
    }
}

impl Encode for Blob {
    fn encode(&self, out: &mut Vec<u8>) {
        let len = u16::try_from(self.0.len()).expect("a blob of at most 65535 bytes");
        len.encode(out);
        out.extend_from_slice(&self.0);
    }
}

macro_rules! encode_struct {
    ($name:ident { $($field:ident),* }) => {
        impl Encode for $name {
            fn encode(&self, out: &mut Vec<u8>) {
                $(self.$field.encode(out);)*
            }
        }
    };
}

/// `encode_enum!(Name; count; Variant => index, Variant(a, b) => index, Variant { a, b } => index)`
macro_rules! encode_enum {
    ($name:ident; $count:expr; $($variant:ident $( ( $($tf:ident),* ) )? $( { $($sf:ident),* } )? => $index:expr),* $(,)?) => {
        impl Encode for $name {
            fn encode(&self, out: &mut Vec<u8>) {
                match self {
                    $(
                        $name::$variant $( ( $($tf),* ) )? $( { $($sf),* } )? => {
                            variant(out, $index, $count);
                            $( $( $tf.encode(out); )* )?
                            $( $( $sf.encode(out); )* )?
                        }
                    )*
                }
            }
        }
    };
}

encode_struct!(FrontInput {
    config,
    inner,
    batches
});
encode_struct!(Config {
    max_entries,
    max_waiters,
    max_replays,
    grpc,
    report
});
encode_enum!(InnerReply; 6;
    Ok { delay } => 0, Refused => 1, Fail => 2, Large => 3, Hang => 4, Custom(c) => 5);
encode_struct!(CustomReply {
    status,
    version,
    delay,
    headers,
    body,
    chunk,
    trailers
});
encode_enum!(StatusChoice; 4; Ok => 0, BadRequest => 1, Unauthorized => 2, Unavailable => 3);
encode_enum!(ResponseHeaderName; 6;
    GrpcStatus => 0, SetCookie => 1, CacheControl => 2, ContentLength => 3, ContentType => 4,
    Raw(b) => 5);
encode_struct!(Batch {
    advance,
    invalidate,
    requests
});
encode_enum!(Invalidate; 3; Token(t) => 0, Subject(s) => 1, Alice => 2);
encode_struct!(Req {
    method,
    path,
    headers,
    body,
    client,
    dpop
});
encode_struct!(ClientAuth {
    id,
    credential,
    basic,
    also
});
encode_enum!(ClientIdChoice; 3; A => 0, B => 1, Raw(b) => 2);
encode_enum!(CredentialChoice; 3; None => 0, Secret(s) => 1, Assertion(a) => 2);
encode_enum!(SecretChoice; 4; One => 0, Two => 1, Empty => 2, Raw(b) => 3);
encode_enum!(AssertionChoice; 4;
    A => 0, B => 1, WithoutType => 2, Raw { kind, assertion } => 3);
encode_enum!(DpopChoice; 5;
    Valid(k) => 0, Corrupt { key, fault } => 1, Replay(n) => 2, Twice(k) => 3, Raw(b) => 4);
encode_enum!(KeyChoice; 2; A => 0, B => 1);
encode_enum!(DpopFault; 14;
    Signature => 0, Method => 1, Htu => 2, OtherOrigin => 3, OldIat => 4, FutureIat => 5,
    Typ => 6, AlgNone => 7, NoJti => 8, EmptyJti => 9, OtherJwk => 10, PrivateJwk => 11,
    NoJwk => 12, Truncated => 13);
encode_enum!(MethodChoice; 4; Post => 0, Get => 1, Put => 2, Raw(b) => 3);
encode_enum!(PathChoice; 7;
    Refresh => 0, Grpc => 1, RefreshQuery(q) => 2, Absolute => 3, TrailingSlash => 4,
    Other => 5, Raw(b) => 6);
encode_enum!(TokenChoice; 6;
    Valid => 0, Valid2 => 1, Expired => 2, Access => 3, Mutated { at, op, bytes } => 4,
    Raw(b) => 5);
encode_enum!(Mutation; 4; Overwrite => 0, Insert => 1, Delete => 2, Truncate => 3);
encode_enum!(HeaderChoice; 6;
    Authorization(a) => 0, Cookie(c) => 1, ContentType(c) => 2, ContentLength(l) => 3,
    Metadata { bearer, token } => 4, Raw { name, value } => 5);
encode_enum!(AuthChoice; 5;
    Bearer(t) => 0, BearerOddly { lower, spaces, token } => 1, Basic { user, password } => 2,
    BasicRaw(b) => 3, Garbage(b) => 4);
encode_enum!(CookieChoice; 3; Token(t) => 0, Among(t) => 1, Raw(b) => 2);
encode_enum!(ContentTypeChoice; 7;
    Json => 0, JsonCharset => 1, PlusJson => 2, Form => 3, FormCharset => 4, Text => 5,
    Raw(b) => 6);
encode_enum!(LengthChoice; 3; Actual => 0, Number(n) => 1, Raw(b) => 2);
encode_enum!(NameChoice; 7;
    Authorization => 0, Cookie => 1, ContentType => 2, ContentLength => 3, RefreshToken => 4,
    GrpcStatus => 5, Other => 6);
encode_enum!(BodyChoice; 7;
    Empty => 0, Json { token, pad, extra } => 1, Form { grant, token, client, extra } => 2,
    Raw(b) => 3, Repeat { unit, count } => 4, Chunked { chunk, body } => 5,
    Failing { body } => 6);
encode_enum!(GrantChoice; 3; Refresh => 0, AuthorizationCode => 1, Raw(b) => 2);
encode_enum!(TokenInput; 6;
    Verify(b) => 0, Choice { token, pad } => 1, SignJson { header, payload } => 2,
    SignSegments { header, payload } => 3, Claims(c) => 4, Extract(r) => 5);
encode_struct!(ClaimsSpec {
    alg,
    typ,
    crit,
    sub,
    exp,
    nbf,
    duplicate,
    extra
});
encode_enum!(AlgChoice; 5; Hs256 => 0, Hs384 => 1, None => 2, Raw(b) => 3, Missing => 4);
encode_enum!(TypChoice; 7;
    Refresh => 0, ApplicationRefresh => 1, Upper => 2, Access => 3, Jwt => 4, Raw(b) => 5,
    Missing => 6);
encode_enum!(DuplicateChoice; 2; Plain(i) => 0, Escaped(i) => 1);
encode_enum!(ValueChoice; 10;
    FromNow(s) => 0, FromNowFloat(s) => 1, Int(i) => 2, Float(f) => 3, Str(b) => 4,
    Bool(b) => 5, Null => 6, Array => 7, Object => 8, Raw(b) => 9);

/// Decodes `bytes` as `T` the way the fuzz targets do.
pub fn decode<'a, T: Arbitrary<'a>>(bytes: &'a [u8]) -> Option<T> {
    T::arbitrary(&mut Unstructured::new(bytes)).ok()
}
