//! The `front` harness: a fresh layer per input in front of a counting inner service that
//! checks, inside the service, that it is only called with a token that verifies (or with
//! a request the layer may let through: another grant type, another path).

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap},
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::future::join_all;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version, header};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::{
    runtime::Runtime,
    time::{Instant, sleep, timeout},
};
use tower::{Layer, Service, ServiceExt};
use tower_refresh_coalesce::{
    BoxError, HttpExtract, HttpShare, Opaque, RefreshCoalesceLayer, RefreshGrant, TokenSource,
    Verify, http::RequestBody, token::DpopVerifier,
};

use crate::{
    dpop::{self, Proofs},
    input::{
        Batch, Blob, Config, CustomReply, FrontInput, InnerReply, Invalidate, Req,
        ResponseHeaderName, StatusChoice,
    },
    model::{self, Credential, FuzzBody, Identity, METADATA, PATHS, REQUEST_ID, Seen, Sender},
    tokens::{self, FINGERPRINT_SECRET},
};

/// How long a caller waits for a flight.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an inner call may run.
pub const HARD_CAP: Duration = Duration::from_secs(3);
/// How long a successful result is replayed.
pub const TTL: Duration = Duration::from_secs(2);
/// A request that has not resolved after this long (of the paused clock) hangs.
const HANG: Duration = Duration::from_secs(120);
/// The most batches and requests per batch of one input.
const MAX_BATCHES: usize = 6;
const MAX_REQUESTS: usize = 8;
/// The header the inner service numbers its responses with.
const INNER_CALL: HeaderName = HeaderName::from_static("x-inner-call");
const COALESCED: HeaderName = HeaderName::from_static("x-refresh-coalesced");
/// A response body over the share cap (64 KiB).
const LARGE: usize = 70 * 1024;

thread_local! {
    /// One current-thread runtime per thread (the fuzzer has one thread; tests have
    /// several), with the clock paused: timers fire as soon as every task is idle, so
    /// waits and timeouts cost no real time. Flight tasks run on the thread that drives it.
    static RUNTIME: Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    static VIOLATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

pub(crate) fn block_on<F: Future>(future: F) -> F::Output {
    RUNTIME.with(|runtime| runtime.block_on(future))
}

/// Whether a token may lead a flight, by the harness's own judgement.
pub type Accepts = fn(&str) -> Result<(), String>;

fn jwt_accepts(token: &str) -> Result<(), String> {
    tokens::verifier()
        .verify(token)
        .map(drop)
        .map_err(|e| e.to_string())
}

fn opaque_accepts(token: &str) -> Result<(), String> {
    Opaque.verify(token).map(drop).map_err(|e| e.to_string())
}

/// The `front` target: HS256 JWT verification.
pub fn run_front(input: &FrontInput) -> Summary {
    let extract = HttpExtract::new(tokens::verifier().clone());
    block_on(run(input, extract, jwt_accepts))
}

/// Any extractor, judged by `accepts`: for the harness's own tests.
pub fn run_front_with<V: Verify>(
    input: &FrontInput,
    extract: HttpExtract<V>,
    accepts: Accepts,
) -> Summary {
    block_on(run(input, extract, accepts))
}

/// One request through a layer that lets every well-formed token through (`Opaque`): the
/// token target's extraction mode.
pub fn run_extract(req: &Req) {
    let input = FrontInput {
        config: Config::roomy(),
        inner: Vec::new(),
        batches: vec![Batch {
            advance: 0,
            invalidate: None,
            requests: vec![req.clone()],
        }],
    };
    block_on(run(&input, HttpExtract::new(Opaque), opaque_accepts));
}

/// What the inner service saw and answered, call by call.
#[derive(Default)]
struct Record {
    calls: Vec<Call>,
    batch: usize,
}

struct Call {
    batch: usize,
    request: usize,
    /// `Some` when the call was coalesced: the token, client id, client credential and DPoP
    /// key it ran for.
    identity: Option<Identity>,
    /// What it answered (`None`: an error, or not yet).
    answered: Option<Answer>,
    failed: bool,
}

fn lock(record: &Mutex<Record>) -> std::sync::MutexGuard<'_, Record> {
    record.lock().unwrap_or_else(|p| p.into_inner())
}

type InnerResponse = Response<FuzzBody>;

/// What the inner service answered: status, version, headers, body, trailers.
type Answer = (StatusCode, Version, HeaderMap, Bytes, Option<HeaderMap>);

/// The counting inner service.
#[derive(Clone)]
struct Inner {
    record: Arc<Mutex<Record>>,
    replies: Arc<Vec<InnerReply>>,
    accepts: Accepts,
    /// The valid DPoP proofs the harness made this run.
    proofs: Arc<Mutex<Proofs>>,
}

impl Service<Request<RequestBody<FuzzBody>>> for Inner {
    type Response = InnerResponse;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<InnerResponse, io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<RequestBody<FuzzBody>>) -> Self::Future {
        let n = {
            let mut record = lock(&self.record);
            let batch = record.batch;
            record.calls.push(Call {
                batch,
                request: usize::MAX,
                identity: None,
                answered: None,
                failed: false,
            });
            record.calls.len()
        };
        let reply = if self.replies.is_empty() {
            InnerReply::Ok { delay: 0 }
        } else {
            self.replies[(n - 1) % self.replies.len()].clone()
        };
        let record = self.record.clone();
        let accepts = self.accepts;
        let proofs = self.proofs.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = body.collect().await.ok().map(|c| c.to_bytes());
            let seen = {
                let proofs = proofs.lock().unwrap_or_else(|p| p.into_inner());
                model::model(parts.uri.path(), &parts.headers, body.as_deref(), &proofs)
            };
            let request = request_id(&parts.headers);
            let grant = parts.extensions.get::<RefreshGrant>();
            let identity = check_admitted(&seen, accepts, &parts.headers, grant);
            {
                let mut record = lock(&record);
                let call = &mut record.calls[n - 1];
                call.request = request;
                call.identity = identity;
            }
            let plain = |status, extra: Bytes| {
                let (status, headers, body) = pair(n, request, status, extra);
                (status, Version::HTTP_11, headers, body, None, 0)
            };
            let response = match reply {
                InnerReply::Ok { delay } => {
                    sleep(Duration::from_millis(u64::from(delay % 2500))).await;
                    Some(plain(StatusCode::OK, Bytes::new()))
                }
                InnerReply::Refused => Some(plain(StatusCode::BAD_REQUEST, Bytes::new())),
                InnerReply::Fail => None,
                InnerReply::Large => Some(plain(StatusCode::OK, Bytes::from(vec![b'x'; LARGE]))),
                InnerReply::Hang => {
                    sleep(HARD_CAP * 3).await;
                    Some(plain(StatusCode::OK, Bytes::new()))
                }
                InnerReply::Custom(custom) => {
                    sleep(Duration::from_millis(u64::from(custom.delay % 2500))).await;
                    Some(custom_answer(n, request, &custom))
                }
            };
            let mut record = lock(&record);
            let call = &mut record.calls[n - 1];
            match response {
                Some((status, version, headers, body, trailers, chunk)) => {
                    call.answered = Some((
                        status,
                        version,
                        headers.clone(),
                        body.clone(),
                        trailers.clone(),
                    ));
                    let body: FuzzBody = if chunk == 0 && trailers.is_none() {
                        Full::new(body).map_err(|never| match never {}).boxed()
                    } else {
                        let size = if chunk == 0 { body.len().max(1) } else { chunk };
                        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = (0..body.len())
                            .step_by(size)
                            .map(|i| Ok(Frame::data(body.slice(i..(i + size).min(body.len())))))
                            .collect();
                        if let Some(trailers) = trailers {
                            frames.push(Ok(Frame::trailers(trailers)));
                        }
                        StreamBody::new(futures_util::stream::iter(frames)).boxed()
                    };
                    let mut response = Response::new(body);
                    *response.status_mut() = status;
                    *response.version_mut() = version;
                    *response.headers_mut() = headers;
                    Ok(response)
                }
                None => {
                    call.failed = true;
                    Err(io::Error::other("identity server unavailable"))
                }
            }
        })
    }
}

/// A fuzzer-shaped answer (and its frame size), around the harness's own pair.
fn custom_answer(
    n: usize,
    request: usize,
    custom: &CustomReply,
) -> (
    StatusCode,
    Version,
    HeaderMap,
    Bytes,
    Option<HeaderMap>,
    usize,
) {
    let status = match custom.status {
        StatusChoice::Ok => StatusCode::OK,
        StatusChoice::BadRequest => StatusCode::BAD_REQUEST,
        StatusChoice::Unauthorized => StatusCode::UNAUTHORIZED,
        StatusChoice::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    };
    let version = match custom.version % 5 {
        0 => Version::HTTP_09,
        1 => Version::HTTP_10,
        2 => Version::HTTP_11,
        3 => Version::HTTP_2,
        _ => Version::HTTP_3,
    };
    let (status, mut headers, body) = pair(
        n,
        request,
        status,
        Bytes::copy_from_slice(custom.body.capped(70 * 1024)),
    );
    let fields = |list: &[(ResponseHeaderName, Blob)]| {
        let mut fields = Vec::new();
        for (name, value) in list.iter().take(8) {
            let name = match name {
                ResponseHeaderName::GrpcStatus => HeaderName::from_static("grpc-status"),
                ResponseHeaderName::SetCookie => header::SET_COOKIE,
                ResponseHeaderName::CacheControl => header::CACHE_CONTROL,
                ResponseHeaderName::ContentLength => header::CONTENT_LENGTH,
                ResponseHeaderName::ContentType => header::CONTENT_TYPE,
                ResponseHeaderName::Raw(raw) => match HeaderName::from_bytes(raw.capped(64)) {
                    Ok(name) => name,
                    Err(_) => continue,
                },
            };
            if name == INNER_CALL || name == COALESCED {
                continue;
            }
            if let Ok(value) = HeaderValue::from_bytes(value.capped(256)) {
                fields.push((name, value));
            }
        }
        fields
    };
    for (name, value) in fields(&custom.headers) {
        headers.append(name, value);
    }
    let trailers = custom.trailers.as_deref().map(|list| {
        let mut map = HeaderMap::new();
        for (name, value) in fields(list) {
            map.append(name, value);
        }
        map
    });
    (
        status,
        version,
        headers,
        body,
        trailers,
        usize::from(custom.chunk),
    )
}

fn request_id(headers: &HeaderMap) -> usize {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("every request carries its id to the inner service")
}

/// Fails a check with a message.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// The check inside the inner service. A call from a flight (the layer spawns one task per
/// flight; a bypassed request is called from the caller's own future) carries exactly one
/// token, which verifies, on a coalesced path; a bypassed request on a coalesced path is a
/// form of another grant type, whatever a header or cookie carries (F2). Returns the call's identity
/// when it was coalesced.
///
/// Under libFuzzer a panic aborts at once. Elsewhere (tests) tokio catches a panic in the
/// flight's task, so the failure is also recorded and raised again by `run`.
fn check_admitted(
    seen: &Seen,
    accepts: Accepts,
    headers: &HeaderMap,
    grant: Option<&RefreshGrant>,
) -> Option<Identity> {
    match admitted(seen, accepts, headers, grant) {
        Ok(identity) => identity,
        Err(violation) => {
            VIOLATION.with(|slot| {
                slot.borrow_mut().get_or_insert_with(|| violation.clone());
            });
            panic!("{violation}");
        }
    }
}

/// Raises a violation recorded inside the inner service.
fn raise_violation() {
    let violation = VIOLATION.with(|slot| slot.borrow_mut().take());
    if let Some(violation) = violation {
        panic!("{violation}");
    }
}

fn admitted(
    seen: &Seen,
    accepts: Accepts,
    headers: &HeaderMap,
    grant: Option<&RefreshGrant>,
) -> Result<Option<Identity>, String> {
    let coalesced = tokio::task::try_id().is_some();
    if !coalesced {
        ensure!(
            !seen.in_scope || seen.other_grant,
            "a request on a coalesced path reached the inner service uncoalesced: {seen:?}, \
             headers {headers:?}"
        );
        return Ok(None);
    }
    ensure!(
        seen.in_scope,
        "a request outside the coalesced paths was coalesced: {seen:?}"
    );
    ensure!(
        seen.tokens.len() == 1,
        "inner service called from a flight with {} different tokens: {seen:?}, headers \
         {headers:?}",
        seen.tokens.len()
    );
    ensure!(
        seen.clients.len() <= 1,
        "inner service called with {} different client ids: {seen:?}",
        seen.clients.len()
    );
    ensure!(
        seen.credentials.len() <= 1,
        "inner service called with {} client authentication methods or credentials: {:?}",
        seen.credentials.len(),
        seen.clients
    );
    ensure!(
        seen.sender != Sender::Invalid,
        "an invalid DPoP proof reached the inner service: {:?}",
        seen.proofs
    );
    let token = seen.tokens.iter().next().expect("one token");
    if let Err(why) = accepts(token) {
        return Err(format!(
            "inner service called with a token that does not verify ({why}): {token:?}"
        ));
    }
    ensure!(
        !seen.other_grant,
        "F2: a form of another grant type was coalesced (by a token in a header): \
         {seen:?}, headers {headers:?}"
    );
    ensure!(
        !seen.ambiguous_content_type,
        "F1: inner service called with conflicting Content-Type headers: {:?}",
        headers
            .get_all(header::CONTENT_TYPE)
            .iter()
            .collect::<Vec<_>>()
    );
    let identity = seen.identity().expect("checked above");
    // What the layer hands the inner service is what it keyed and verified.
    let Some(grant) = grant else {
        return Err("a call from a flight without a RefreshGrant extension".into());
    };
    let credential = match (grant.client_secret(), grant.client_assertion()) {
        (Some(secret), None) => Some(Credential::Secret(secret.to_owned())),
        (None, Some((kind, assertion))) => Some(Credential::Assertion {
            kind: kind.to_owned(),
            assertion: assertion.to_owned(),
        }),
        (None, None) => None,
        (Some(_), Some(_)) => return Err("a grant with a secret and an assertion".into()),
    };
    let granted = Identity {
        token: grant.token().to_owned(),
        client: grant.client_id().map(str::to_owned),
        credential,
        sender: grant.dpop_thumbprint().map(str::to_owned),
    };
    ensure!(
        granted == identity,
        "the RefreshGrant differs from the request: the layer read {:?} (client {:?}, \
         credential {:?}, sender {:?}), the request carries {:?} (credential {:?}, sender \
         {:?})",
        granted.token == identity.token,
        granted.client,
        granted.credential,
        granted.sender,
        identity.client,
        identity.credential,
        identity.sender
    );
    ensure!(
        grant.claims().is_some(),
        "a flight's RefreshGrant without verified claims"
    );
    Ok(Some(identity))
}

/// The inner service's answer: a new pair naming its call and request.
fn pair(
    n: usize,
    request: usize,
    status: StatusCode,
    extra: Bytes,
) -> (StatusCode, HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    headers.insert(INNER_CALL, HeaderValue::from(n));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.append(
        header::SET_COOKIE,
        HeaderValue::from_str(&format!("refresh_token=refresh-{n}; HttpOnly")).expect("ascii"),
    );
    headers.append(header::SET_COOKIE, HeaderValue::from_static("session=1"));
    let body = if status.is_success() {
        format!(
            r#"{{"access_token":"access-{n}","refresh_token":"refresh-{n}","request":{request}}}"#
        )
    } else {
        r#"{"error":"invalid_grant"}"#.to_owned()
    };
    let mut body = body.into_bytes();
    body.extend_from_slice(&extra);
    (status, headers, Bytes::from(body))
}

/// What one caller got.
struct Outcome {
    id: usize,
    seen: Seen,
    /// The virtual time from the call to the response.
    waited: Duration,
    result: Result<Answer, io::Error>,
}

async fn run<V: Verify>(input: &FrontInput, extract: HttpExtract<V>, accepts: Accepts) -> Summary {
    let config = &input.config;
    let extract = extract
        .dpop(
            DpopVerifier::builder()
                .origin(dpop::ORIGIN)
                .build()
                .expect("a valid DPoP configuration"),
        )
        .paths(PATHS)
        .sources([
            TokenSource::bearer(),
            TokenSource::cookie("refresh_token"),
            TokenSource::json("refresh_token"),
            TokenSource::form(),
            TokenSource::metadata(METADATA),
        ])
        .secret(FINGERPRINT_SECRET);
    let mut share = HttpShare::new().report_coalescing(config.report);
    if config.grpc {
        share = share.grpc();
    }
    let max_entries = 1 + usize::from(config.max_entries % 8);
    let max_waiters = 1 + usize::from(config.max_waiters % 8);
    let mut builder = RefreshCoalesceLayer::http(extract)
        .share(share)
        .ttl(TTL)
        .wait_timeout(WAIT_TIMEOUT)
        .hard_cap(HARD_CAP)
        .max_entries(max_entries)
        .max_waiters(max_waiters);
    if let Some(max) = config.max_replays {
        builder = builder.max_replays(u32::from(max % 4));
    }
    let layer = builder.build();
    let handle = layer.handle();
    let record = Arc::new(Mutex::new(Record::default()));
    let proofs = Arc::new(Mutex::new(Proofs::default()));
    let service = layer.layer(Inner {
        record: record.clone(),
        replies: Arc::new(input.inner.iter().take(8).cloned().collect()),
        accepts,
        proofs: proofs.clone(),
    });

    let mut next_id = 0;
    let mut errors = 0;
    // Across the run: the requests each inner call's answer went to, and how many coalesced
    // answers each DPoP proof got.
    let mut answered: HashMap<usize, (usize, Option<Identity>)> = HashMap::new();
    let mut accepted_proofs: HashMap<String, usize> = HashMap::new();
    let mut summary = Summary::default();
    for (b, batch) in input.batches.iter().take(MAX_BATCHES).enumerate() {
        if batch.advance > 0 {
            sleep(Duration::from_millis(u64::from(batch.advance))).await;
        }
        match &batch.invalidate {
            Some(Invalidate::Token(t)) => {
                handle.invalidate_token(&t.text());
            }
            Some(Invalidate::Subject(s)) => {
                handle.invalidate_subject(&String::from_utf8_lossy(s.capped(64)));
            }
            Some(Invalidate::Alice) => {
                handle.invalidate_subject("alice");
            }
            None => {}
        }
        lock(&record).batch = b;
        let requests: Vec<_> = batch
            .requests
            .iter()
            .take(MAX_REQUESTS)
            .map(|req| {
                next_id += 1;
                let mut proofs = proofs.lock().unwrap_or_else(|p| p.into_inner());
                (next_id, model::build(req, next_id, &mut proofs))
            })
            .collect();
        let outcomes = join_all(requests.into_iter().map(|(id, built)| {
            let service = service.clone();
            async move {
                let start = Instant::now();
                let result = timeout(HANG, async move {
                    let response = service.oneshot(built.request).await?;
                    let (parts, body) = response.into_parts();
                    let collected = body
                        .collect()
                        .await
                        .unwrap_or_else(|e| panic!("request {id}: response body failed: {e}"));
                    let trailers = collected.trailers().cloned();
                    let body = collected.to_bytes();
                    Ok::<_, io::Error>((parts.status, parts.version, parts.headers, body, trailers))
                })
                .await
                .unwrap_or_else(|_| panic!("request {id} hangs: no response after {HANG:?}"));
                Outcome {
                    id,
                    seen: built.seen,
                    waited: start.elapsed(),
                    result,
                }
            }
        }))
        .await;
        raise_violation();

        let record = lock(&record);
        for outcome in &outcomes {
            if crate::debug() {
                match &outcome.result {
                    Ok((status, _, headers, body, _)) => eprintln!(
                        "batch {b} request {}: {status} {:?} {} waited {:?} ({:?})",
                        outcome.id,
                        headers.get(INNER_CALL),
                        String::from_utf8_lossy(&body[..body.len().min(160)]),
                        outcome.waited,
                        outcome.seen,
                    ),
                    Err(e) => eprintln!("batch {b} request {}: error {e}", outcome.id),
                }
            }
            errors += usize::from(outcome.result.is_err());
            check_response(outcome, &record, config.grpc, config.report);
            let call = inner_call(outcome);
            summary.outcomes.push((
                outcome.id,
                outcome.result.as_ref().ok().map(|r| r.0.as_u16()),
                call,
            ));
            let Some(n) = call else { continue };
            // Two requests with one answer: the same token, client id, credential and DPoP
            // key (a bypass's answer goes to its own request alone).
            let mine = outcome.seen.identity();
            let (first, theirs) = answered.entry(n).or_insert((outcome.id, mine.clone()));
            assert!(
                *first == outcome.id || (theirs.is_some() && *theirs == mine),
                "requests {first} and {} got the answer of call {n}: {theirs:?} and {mine:?}",
                outcome.id
            );
            // A proof is accepted once (RFC 9449 §11.1): a replay never gets an answer.
            if record.calls[n - 1].identity.is_some() {
                for proof in &outcome.seen.proofs {
                    let uses = accepted_proofs.entry(proof.clone()).or_default();
                    *uses += 1;
                    assert!(
                        *uses == 1,
                        "request {}: a DPoP proof answered {uses} times (replayed)",
                        outcome.id
                    );
                }
            }
        }
        // Concurrent requests of one key make at most one inner call.
        let mut per_identity: BTreeMap<&Identity, usize> = BTreeMap::new();
        for call in record.calls.iter().filter(|c| c.batch == b) {
            if let Some(identity) = &call.identity {
                *per_identity.entry(identity).or_default() += 1;
            }
        }
        for (identity, calls) in per_identity {
            assert!(
                calls <= 1,
                "batch {b}: {calls} inner calls for one token, client and sender ({identity:?})"
            );
        }
    }

    // Quiescence: every flight ends within the hard cap, every replay within the TTL.
    sleep(HARD_CAP + TTL + Duration::from_secs(2)).await;
    let stats = handle.stats();
    let record = lock(&record);
    if crate::debug() {
        eprintln!("{} inner calls; {stats:?}", record.calls.len());
    }
    let failed = record.calls.iter().filter(|c| c.failed).count();
    assert!(
        errors <= failed,
        "{errors} callers got an inner error, but only {failed} inner calls failed"
    );
    assert_eq!(
        stats.in_flight, 0,
        "flights left running at quiescence: {stats:?}"
    );
    assert_eq!(stats.entries, 0, "entries left at quiescence: {stats:?}");
    let coalesced = record.calls.iter().filter(|c| c.identity.is_some()).count() as u64;
    assert_eq!(
        coalesced, stats.leader,
        "inner calls from flights vs leaders: {stats:?}"
    );
    assert_eq!(
        record.calls.len() as u64 - coalesced,
        stats.bypassed,
        "inner calls from callers vs bypasses: {stats:?}"
    );
    summary.calls = record.calls.len();
    summary.coalesced = coalesced as usize;
    summary
}

/// What a run did, for the harness's own tests: each request's id, status (`None`: an
/// error) and the inner call that answered it, and the number of inner calls.
#[derive(Debug, Default)]
pub struct Summary {
    pub outcomes: Vec<(usize, Option<u16>, Option<usize>)>,
    pub calls: usize,
    pub coalesced: usize,
}

/// The inner call whose answer a caller got.
fn inner_call(outcome: &Outcome) -> Option<usize> {
    let (_, _, headers, _, _) = outcome.result.as_ref().ok()?;
    headers.get(INNER_CALL)?.to_str().ok()?.parse().ok()
}

/// Every caller gets exactly one response, of an expected status; a response of the inner
/// service is one it gave (byte for byte) to a request with the same token and client; a
/// refusal is well-formed and never echoes a token.
fn check_response(outcome: &Outcome, record: &Record, grpc: bool, report: bool) {
    let id = outcome.id;
    let Ok((status, version, headers, body, trailers)) = &outcome.result else {
        return; // An inner error, reaching one caller as itself: counted by the caller.
    };
    assert!(
        matches!(status.as_u16(), 200 | 400 | 401 | 413 | 429 | 503),
        "request {id}: unexpected status {status}"
    );
    if let Some(n) = headers.get(INNER_CALL) {
        let n: usize = n
            .to_str()
            .ok()
            .and_then(|n| n.parse().ok())
            .expect("call number");
        let call = &record.calls[n - 1];
        let (s, v, h, b, t) = call
            .answered
            .as_ref()
            .unwrap_or_else(|| panic!("request {id}: response of call {n}, which never answered"));
        let mut got = headers.clone();
        if report {
            let served = got.remove(COALESCED);
            if call.identity.is_some() {
                assert!(
                    served.as_ref().is_some_and(|v| matches!(
                        v.to_str(),
                        Ok("leader" | "joined" | "replayed")
                    )),
                    "request {id}: x-refresh-coalesced {served:?}"
                );
            }
        }
        assert!(
            (s, v, h, b) == (status, version, &got, body),
            "request {id}: the response of call {n} changed on its way: {:?} became {:?}",
            (s, v, h, b.len()),
            (status, version, &got, body.len()),
        );
        // HTTP/1 has no trailers on a body of known length; the layer keeps them anyway.
        assert!(
            t == trailers,
            "request {id}: the trailers of call {n} changed on their way: {t:?} became {trailers:?}"
        );
        if call.identity.is_some() {
            assert!(
                outcome.waited <= WAIT_TIMEOUT,
                "request {id}: answered from a flight after {:?}",
                outcome.waited
            );
        }
        match (&call.identity, outcome.seen.identity()) {
            (Some(theirs), Some(mine)) if outcome.seen.in_scope && *theirs == mine => {}
            (None, _) if call.request == id => {}
            (theirs, mine) => panic!(
                "request {id} got the response of call {n} (request {}): it ran for \
                 {theirs:?}, this request carries {mine:?} (in scope: {})",
                call.request, outcome.seen.in_scope
            ),
        }
        return;
    }
    // A refusal of the layer. It never echoes a token or a DPoP proof: its texts are static
    // and have no '.', so a token with one (any JWT) cannot appear in them by chance.
    let message = headers
        .get("grpc-message")
        .map_or(&b""[..], |v| v.as_bytes());
    let secrets = outcome.seen.tokens.iter().chain(&outcome.seen.proofs);
    for token in secrets.filter(|t| t.contains('.')) {
        let echoed = |text: &[u8]| text.windows(token.len()).any(|w| w == token.as_bytes());
        assert!(
            !echoed(body) && !echoed(message),
            "request {id}: the refusal echoes the token or proof"
        );
    }
    let value = |name: HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    // A request refused as it was read (malformed, unverified, a bad DPoP proof) never
    // reached the inner service.
    let refused_at_once = if grpc {
        matches!(
            value(HeaderName::from_static("grpc-status")),
            Some("3" | "16")
        )
    } else {
        matches!(status.as_u16(), 400 | 401 | 413)
    };
    if refused_at_once {
        assert!(
            !record.calls.iter().any(|c| c.request == id),
            "request {id}: refused ({status}), yet it reached the inner service"
        );
    }
    if grpc {
        assert_eq!(*status, StatusCode::OK, "request {id}: gRPC refusal status");
        assert_eq!(value(header::CONTENT_TYPE), Some("application/grpc"));
        assert!(
            matches!(
                value(HeaderName::from_static("grpc-status")),
                Some("3" | "8" | "14" | "16")
            ),
            "request {id}: grpc-status {:?}",
            headers.get("grpc-status")
        );
        assert!(
            body.is_empty(),
            "request {id}: a trailers-only refusal has no body"
        );
        return;
    }
    assert_ne!(
        *status,
        StatusCode::OK,
        "request {id}: a 200 the inner service never made"
    );
    assert_eq!(
        value(header::CONTENT_TYPE),
        Some("application/json"),
        "request {id}"
    );
    assert_eq!(
        value(header::CACHE_CONTROL),
        Some("no-store"),
        "request {id}"
    );
    let json: HashMap<String, serde_json::Value> = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("request {id}: refusal body is not a JSON object: {e}"));
    let error = json.get("error").and_then(|e| e.as_str());
    if error == Some("invalid_dpop_proof") {
        assert_eq!(
            *status,
            StatusCode::BAD_REQUEST,
            "request {id}: a DPoP refusal"
        );
        assert!(
            !outcome.seen.proofs.is_empty(),
            "request {id}: invalid_dpop_proof without a DPoP header"
        );
        assert_eq!(
            value(header::WWW_AUTHENTICATE),
            Some(r#"DPoP error="invalid_dpop_proof""#),
            "request {id}: the DPoP challenge"
        );
        return;
    }
    let expected = match status.as_u16() {
        400 | 413 => "invalid_request",
        401 => "invalid_grant",
        _ => "temporarily_unavailable",
    };
    // `invalid_grant` may be configured to 400; it is not here.
    assert_eq!(
        error,
        Some(expected),
        "request {id}: {status} with error {error:?}"
    );
    assert!(
        json.get("error_description").is_some_and(|d| d.is_string()),
        "request {id}: no error_description"
    );
    if *status == StatusCode::UNAUTHORIZED {
        assert!(
            headers.contains_key(header::WWW_AUTHENTICATE),
            "request {id}: 401 without a challenge"
        );
    }
    if matches!(status.as_u16(), 429 | 503) {
        assert!(
            headers.contains_key(header::RETRY_AFTER),
            "request {id}: {status} without Retry-After"
        );
    }
    // A refusal is immediate, or comes when the wait for a flight ends.
    assert!(
        outcome.waited <= WAIT_TIMEOUT,
        "request {id}: refused after {:?}",
        outcome.waited
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeds::front_seeds;
    use tower_refresh_coalesce::{Verified, error::Rejected};

    fn seed(name: &str) -> FrontInput {
        front_seeds()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, input)| input)
            .expect("seed")
    }

    fn accept_all(_token: &str) -> Result<Verified, Rejected> {
        Ok(Verified::new().subject("anyone"))
    }

    /// The harness catches a layer that lets an unverified token through.
    #[test]
    #[should_panic(expected = "token that does not verify")]
    fn a_layer_that_does_not_verify_is_caught() {
        run_front_with(
            &seed("bad-alg-none"),
            HttpExtract::new(accept_all),
            jwt_accepts,
        );
    }

    fn statuses(summary: &Summary) -> Vec<Option<u16>> {
        summary
            .outcomes
            .iter()
            .map(|(_, status, _)| *status)
            .collect()
    }

    /// The inner calls that answered the requests, in request order.
    fn answers(summary: &Summary) -> Vec<Option<usize>> {
        summary.outcomes.iter().map(|(_, _, call)| *call).collect()
    }

    /// Fresh proofs of one key coalesce; another key, or none, is another answer; a replay
    /// within the TTL keeps the key apart too.
    #[test]
    fn fresh_proofs_of_one_key_share_and_other_keys_do_not() {
        let summary = run_front(&seed("dpop-two-keys"));
        assert_eq!(statuses(&summary), vec![Some(200); 9], "{summary:?}");
        let calls = answers(&summary);
        assert_eq!(summary.coalesced, 3, "{summary:?}");
        // A, A, B, none, A (Bearer), A (absolute URI); then A, B, none replayed.
        assert!(calls[0] == calls[1] && calls[1] == calls[4] && calls[4] == calls[5]);
        assert!(calls[0] != calls[2] && calls[0] != calls[3] && calls[2] != calls[3]);
        assert_eq!(&calls[6..], &[calls[0], calls[2], calls[3]]);
    }

    /// Each client id and secret is its own answer, from Basic, form or JSON alike.
    #[test]
    fn clients_and_secrets_keep_answers_apart() {
        let summary = run_front(&seed("client-basic-secrets"));
        assert_eq!(statuses(&summary), vec![Some(200); 12], "{summary:?}");
        assert_eq!(summary.coalesced, 5, "{summary:?}");
        let summary = run_front(&seed("client-secrets-in-form-and-json"));
        assert_eq!(statuses(&summary), vec![Some(200); 12], "{summary:?}");
        // app-a s3cret (form and JSON alike), app-a other, s3cret without an id, app-a
        // public, app-b with an empty secret.
        assert_eq!(summary.coalesced, 5, "{summary:?}");
        let summary = run_front(&seed("client-assertions"));
        let s = statuses(&summary);
        assert_eq!(
            &s[..6],
            &[
                Some(200),
                Some(200),
                Some(200),
                Some(200),
                Some(400),
                Some(400)
            ]
        );
        assert_eq!(summary.coalesced, 3, "{summary:?}");
    }

    /// Two authentication methods are refused, even with the same secret twice (RFC 6749
    /// §2.3: one method per request).
    #[test]
    fn two_client_authentication_methods_are_refused() {
        let summary = run_front(&seed("client-two-methods"));
        assert_eq!(
            statuses(&summary),
            vec![
                Some(400),
                Some(400),
                Some(400),
                Some(400),
                Some(400),
                Some(400)
            ],
            "{summary:?}"
        );
    }

    /// Every kind of invalid proof is refused and never reaches the inner service; a
    /// replayed proof is refused, however it is sent.
    #[test]
    fn invalid_and_replayed_proofs_are_refused() {
        let summary = run_front(&seed("dpop-invalid-proofs"));
        assert_eq!(statuses(&summary), vec![Some(400); 16], "{summary:?}");
        assert_eq!(summary.calls, 0);
        let summary = run_front(&seed("dpop-replays"));
        assert_eq!(
            statuses(&summary),
            vec![Some(200), Some(400), Some(400), Some(200), Some(400)],
            "{summary:?}"
        );
        let summary = run_front(&seed("dpop-on-bypasses"));
        // Bypasses are not the layer's to check; a refresh with a broken proof is refused.
        assert_eq!(
            statuses(&summary),
            vec![Some(200), Some(200), Some(200), Some(400)],
            "{summary:?}"
        );
    }

    /// The oracle: an invalid proof in a flight's request, or a grant that is not what the
    /// request carries, is a violation.
    #[test]
    fn the_oracle_catches_an_invalid_proof_and_a_wrong_grant() {
        let request = &seed("dpop-two-keys").batches[0].requests[0];
        let mut proofs = Proofs::default();
        let built = model::build(request, 1, &mut proofs);
        let mut seen = built.seen.clone();
        assert!(matches!(seen.sender, Sender::Key(_)));
        let headers = built.request.headers().clone();
        let grant = RefreshGrant::read(&headers, b"", &[TokenSource::cookie("refresh_token")])
            .expect("reads")
            .expect("a refresh");
        let in_a_task = |seen: Seen, grant: Option<RefreshGrant>| {
            let headers = headers.clone();
            block_on(async move {
                tokio::spawn(async move { admitted(&seen, jwt_accepts, &headers, grant.as_ref()) })
                    .await
                    .expect("no panic")
            })
        };
        // A grant read without the layer has no claims and no DPoP thumbprint.
        let wrong = in_a_task(seen.clone(), Some(grant)).unwrap_err();
        assert!(wrong.contains("RefreshGrant differs"), "{wrong}");
        assert!(
            in_a_task(seen.clone(), None)
                .unwrap_err()
                .contains("without a RefreshGrant")
        );
        seen.sender = Sender::Invalid;
        let invalid = in_a_task(seen, None).unwrap_err();
        assert!(invalid.contains("invalid DPoP proof"), "{invalid}");
    }

    /// ... and a request that reaches the inner service outside a flight with a token.
    #[test]
    #[should_panic(expected = "reached the inner service uncoalesced")]
    fn a_bypass_on_a_coalesced_path_is_caught() {
        let request = &seed("bad-alg-none").batches[0].requests[0];
        let seen = model::build(request, 1, &mut Proofs::default()).seen;
        panic!(
            "{}",
            admitted(&seen, jwt_accepts, &HeaderMap::new(), None).unwrap_err()
        );
    }
}
