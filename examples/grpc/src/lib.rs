//! A tonic gRPC token service behind the coalescing layer.
//!
//! `refresh.v1.TokenService/Refresh` rotates refresh tokens: each call spends the token it is
//! called with and issues a new pair. A client whose access token expired with 500 calls in
//! flight sends 500 refreshes with the same token; the layer turns them into one call of the
//! service, and all 500 get the same new pair.
//!
//! ```text
//! cargo run -p grpc                                   # server and client, one process
//! cargo run --release -p grpc -- server [--addr 127.0.0.1:50051]
//! cargo run --release -p grpc -- client [--addr 127.0.0.1:50051] [--calls 500] [--token JWT]
//! ```
//!
//! - The refresh token travels in the `x-refresh-token` metadata entry, not in the message.
//! - Refresh tokens are HS256 JWTs with the header `typ: refresh+jwt` and the claims `sub`,
//!   `exp` and `jti`; the layer verifies one before its call may reach the service.
//! - The layer's refusals are trailers-only gRPC statuses (`Unauthenticated` for a missing
//!   or invalid token), not JSON bodies.
//! - The layer is server-wide but coalesces the Refresh method only (`HttpExtract::paths`):
//!   other methods pass through untouched.
//!
//! The protobuf code in `src/refresh.v1.rs` is generated from `proto/refresh.proto` once and
//! checked in, so that the crate needs no build script (and no `protoc`);
//! `tests/grpc_example.rs` regenerates it and fails if the two differ. This library is the
//! service and its client; `src/main.rs` is the command line.

use std::{
    collections::HashSet,
    fmt,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures_util::future::{join_all, try_join_all};
use http::HeaderName;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use tokio::net::TcpListener;
use tonic::{
    Code, Status,
    transport::{Channel, Server, server::TcpIncoming},
};
pub use tower_refresh_coalesce::BoxError;
use tower_refresh_coalesce::{
    HttpExtract, HttpShare, JwtVerifier, RefreshCoalesceLayer, TokenSource, Verify,
    token::ConfigError,
};

use self::pb::{
    RefreshReply, RefreshRequest, StatsReply, StatsRequest,
    account_service_server::AccountServiceServer,
    token_service_client::TokenServiceClient,
    token_service_server::{TokenService, TokenServiceServer},
};

/// The code generated from `proto/refresh.proto` (package `refresh.v1`).
pub mod pb {
    include!("refresh.v1.rs");
}

/// The HS256 secret of the example's tokens. A real one is 32 or more random bytes from a
/// secret store.
pub const SECRET: &[u8] = b"grpc example secret: use 32+ random bytes";
/// The metadata entry that carries the refresh token.
pub const TOKEN_METADATA: &str = "x-refresh-token";
/// The path of the one method the layer coalesces.
pub const REFRESH_METHOD: &str = "/refresh.v1.TokenService/Refresh";
/// How long the simulated upstream (the token store) takes to rotate a token.
pub const UPSTREAM_LATENCY: Duration = Duration::from_millis(50);
/// The lifetime of the access tokens the service issues.
pub const ACCESS_TTL: Duration = Duration::from_secs(15 * 60);
/// The lifetime of the refresh tokens the service issues.
pub const REFRESH_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// The address the service listens on, and the client calls, by default.
pub const DEFAULT_ADDR: &str = "127.0.0.1:50051";
const REFRESH_TYP: &str = "refresh+jwt";
const ACCESS_TYP: &str = "at+jwt";
/// Concurrent calls per connection: hyper's HTTP/2 server allows 200 concurrent streams per
/// connection by default, so a storm is spread over several connections.
const CALLS_PER_CONNECTION: usize = 100;

pub mod account;
pub mod bearer;

// ---------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: u64,
    jti: String,
}

fn mint(
    secret: &[u8],
    typ: &str,
    subject: &str,
    ttl: Duration,
) -> jsonwebtoken::errors::Result<String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    mint_at(secret, typ, subject, now + ttl)
}

/// A token of `typ` for `subject` expiring at `exp` (since the Unix epoch).
fn mint_at(
    secret: &[u8],
    typ: &str,
    subject: &str,
    exp: Duration,
) -> jsonwebtoken::errors::Result<String> {
    let mut header = Header::new(Algorithm::HS256);
    header.typ = Some(typ.to_owned());
    let claims = Claims {
        sub: subject,
        exp: exp.as_secs(),
        jti: format!("{:032x}", rand::random::<u128>()),
    };
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret))
}

/// A refresh token for `subject`, signed with `secret` (the service's is [`SECRET`]).
pub fn mint_refresh_token(secret: &[u8], subject: &str) -> jsonwebtoken::errors::Result<String> {
    mint(secret, REFRESH_TYP, subject, REFRESH_TTL)
}

/// An access token for `subject`, signed with `secret`: not a refresh token.
pub fn mint_access_token(secret: &[u8], subject: &str) -> jsonwebtoken::errors::Result<String> {
    mint(secret, ACCESS_TYP, subject, ACCESS_TTL)
}

/// The verifier of the service's refresh tokens: HS256 with [`SECRET`], `typ: refresh+jwt`.
pub fn refresh_token_verifier() -> Result<JwtVerifier, ConfigError> {
    JwtVerifier::hs256(SECRET).typ(REFRESH_TYP).build()
}

// ---------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------

/// Counts calls; clones share the count.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// The count so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    pub(crate) fn increment(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// The token service: verifies the refresh token, rotates it (a simulated 50 ms upstream)
/// and returns the new pair. It counts the Refresh calls that reach it.
#[derive(Debug, Clone)]
pub struct TokenServer {
    verifier: JwtVerifier,
    calls: Counter,
    account: account::AccountCounters,
}

impl TokenServer {
    /// A service that accepts the refresh tokens `verifier` accepts.
    pub fn new(verifier: JwtVerifier) -> Self {
        Self {
            verifier,
            calls: Counter::default(),
            account: account::AccountCounters::default(),
        }
    }

    /// The counters of the account service [`serve`] runs beside it.
    pub fn account(&self) -> account::AccountCounters {
        self.account.clone()
    }

    /// The number of Refresh calls that reached the service.
    pub fn calls(&self) -> Counter {
        self.calls.clone()
    }
}

#[tonic::async_trait]
impl TokenService for TokenServer {
    async fn refresh(
        &self,
        request: tonic::Request<RefreshRequest>,
    ) -> Result<tonic::Response<RefreshReply>, Status> {
        self.calls.increment();
        // The service stays the authority: the layer verified the token before this call
        // could lead, but a token store would now also check that the token's `jti` is
        // unspent (reuse detection) and spend it.
        let token = request
            .metadata()
            .get(TOKEN_METADATA)
            .and_then(|value| value.to_str().ok())
            .ok_or_else(|| Status::unauthenticated("no refresh token"))?;
        let verified = self
            .verifier
            .verify(token)
            .map_err(|_| Status::unauthenticated("invalid refresh token"))?;
        let subject = verified.subject.unwrap_or_default();
        tokio::time::sleep(UPSTREAM_LATENCY).await;
        let internal = |_| Status::internal("could not sign a token");
        Ok(tonic::Response::new(RefreshReply {
            access_token: mint_access_token(SECRET, &subject).map_err(internal)?,
            refresh_token: mint_refresh_token(SECRET, &subject).map_err(internal)?,
            expires_in: ACCESS_TTL.as_secs(),
        }))
    }

    async fn stats(
        &self,
        _: tonic::Request<StatsRequest>,
    ) -> Result<tonic::Response<StatsReply>, Status> {
        Ok(tonic::Response::new(StatsReply {
            refresh_calls: self.calls.get(),
        }))
    }
}

/// Serves `service` on `listener`, with the coalescing layer in front of its Refresh method,
/// and the account service beside it (its `Me` method behind an access-token interceptor).
pub async fn serve(listener: TcpListener, service: TokenServer) -> Result<(), BoxError> {
    // `Server::builder().layer(..)` sees every method of the server: coalesce Refresh only.
    let extract = HttpExtract::new(service.verifier.clone())
        .paths([REFRESH_METHOD])
        .sources([TokenSource::metadata(HeaderName::from_static(
            TOKEN_METADATA,
        ))]);
    let layer = RefreshCoalesceLayer::http(extract)
        .share(HttpShare::new().grpc())
        .build();
    let counters = service.account();
    let account = AccountServiceServer::with_interceptor(
        account::AccountServer::new(counters.me.clone()),
        account::AccessCheck::new(SECRET, counters.rejected),
    );
    Server::builder()
        .layer(layer)
        .add_service(TokenServiceServer::new(service))
        .add_service(account)
        .serve_with_incoming(TcpIncoming::from(listener))
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------

/// One HTTP/2 connection to the service at `addr`.
pub async fn connect(addr: SocketAddr) -> Result<TokenServiceClient<Channel>, BoxError> {
    Ok(TokenServiceClient::connect(format!("http://{addr}")).await?)
}

/// One Refresh call, with `token` (if any) in the `x-refresh-token` metadata entry.
pub async fn refresh(
    client: &mut TokenServiceClient<Channel>,
    token: Option<&str>,
) -> Result<RefreshReply, Status> {
    let mut request = tonic::Request::new(RefreshRequest {});
    if let Some(token) = token {
        let value = token
            .parse()
            .map_err(|_| Status::invalid_argument("the token is not ASCII metadata"))?;
        request.metadata_mut().insert(TOKEN_METADATA, value);
    }
    Ok(client.refresh(request).await?.into_inner())
}

/// How many Refresh calls reached the service so far.
pub async fn server_refresh_calls(client: &mut TokenServiceClient<Channel>) -> Result<u64, Status> {
    Ok(client
        .stats(StatsRequest {})
        .await?
        .into_inner()
        .refresh_calls)
}

/// The outcome of a [`storm`].
#[derive(Debug)]
pub struct StormReport {
    /// Every call's result, in call order.
    pub replies: Vec<Result<RefreshReply, Status>>,
    /// How many Refresh calls reached the service during the storm.
    pub server_refresh_calls: u64,
    /// How long the storm took.
    pub elapsed: Duration,
}

impl StormReport {
    /// The number of successful calls.
    pub fn ok(&self) -> usize {
        self.replies.iter().filter(|reply| reply.is_ok()).count()
    }

    /// The number of different token pairs among the successful replies.
    pub fn distinct_pairs(&self) -> usize {
        self.replies
            .iter()
            .flatten()
            .map(|reply| (&reply.access_token, &reply.refresh_token))
            .collect::<HashSet<_>>()
            .len()
    }

    /// The codes of the failed calls, with how many calls failed with each.
    pub fn failures(&self) -> Vec<(Code, usize)> {
        let mut failures: Vec<(Code, usize)> = Vec::new();
        for status in self.replies.iter().filter_map(|reply| reply.as_ref().err()) {
            match failures.iter_mut().find(|(code, _)| *code == status.code()) {
                Some((_, count)) => *count += 1,
                None => failures.push((status.code(), 1)),
            }
        }
        failures
    }
}

impl fmt::Display for StormReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural =
            |n: u64, one: &'static str, many: &'static str| if n == 1 { one } else { many };
        let (calls, pairs) = (self.replies.len() as u64, self.distinct_pairs() as u64);
        let refreshes = self.server_refresh_calls;
        write!(
            f,
            "{calls} {}, {} OK, {refreshes} {} on the server, {pairs} distinct {} ({:?})",
            plural(calls, "call", "calls"),
            self.ok(),
            plural(refreshes, "refresh", "refreshes"),
            plural(pairs, "pair", "pairs"),
            self.elapsed,
        )?;
        for (code, count) in self.failures() {
            write!(f, "; {count} failed with {code:?}")?;
        }
        Ok(())
    }
}

/// `calls` concurrent Refresh calls with `token`, spread over enough connections that none
/// carries more than 100 at once, and the number of Refresh calls the service saw meanwhile.
pub async fn storm(addr: SocketAddr, token: &str, calls: usize) -> Result<StormReport, BoxError> {
    let connections = calls.div_ceil(CALLS_PER_CONNECTION).max(1);
    let clients = try_join_all((0..connections).map(|_| connect(addr))).await?;
    let mut stats = clients[0].clone();
    let before = server_refresh_calls(&mut stats).await?;
    let start = Instant::now();
    let replies = join_all((0..calls).map(|i| {
        let mut client = clients[i % connections].clone();
        async move { refresh(&mut client, Some(token)).await }
    }))
    .await;
    let elapsed = start.elapsed();
    let after = server_refresh_calls(&mut stats).await?;
    Ok(StormReport {
        replies,
        server_refresh_calls: after - before,
        elapsed,
    })
}

/// Runs a storm against `addr` and prints what came back, then what the layer answers
/// without a valid token.
pub async fn client(addr: SocketAddr, calls: usize, token: Option<String>) -> Result<(), BoxError> {
    let token = match token {
        Some(token) => token,
        None => mint_refresh_token(SECRET, "user-42")?,
    };
    let report = storm(addr, &token, calls).await?;
    println!("{report}");

    let mut client = connect(addr).await?;
    let forged = mint_refresh_token(b"not the service's secret, 32+ bytes", "user-42")?;
    for (what, token) in [
        ("without x-refresh-token", None),
        ("with a forged token", Some(forged.as_str())),
    ] {
        match refresh(&mut client, token).await {
            Ok(_) => println!("a call {what}: accepted (unexpected)"),
            Err(status) => println!(
                "a call {what}: {:?} \"{}\" (a trailers-only gRPC status)",
                status.code(),
                status.message()
            ),
        }
    }
    println!(
        "refreshes on the server in all: {}",
        server_refresh_calls(&mut client).await?
    );
    Ok(())
}
