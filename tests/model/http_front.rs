//! The same model through `RefreshCoalesceLayer::http`: JWT verification, keyed
//! fingerprints, buffered responses, JSON refusals.

use super::tokens;
use super::*;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use jsonwebtoken::EncodingKey;
use std::sync::OnceLock;
use tower_refresh_coalesce::{HttpExtract, JwtVerifier, http::RequestBody, http::ResponseBody};

type Body = Full<Bytes>;

/// Three valid refresh tokens of three subjects, then one with a forged signature.
fn minted() -> &'static [String; 4] {
    static TOKENS: OnceLock<[String; 4]> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let forged = tokens::encode(
            jsonwebtoken::Algorithm::HS256,
            Some(tokens::REFRESH_TYP),
            &tokens::claims("mallory"),
            &EncodingKey::from_secret(b"not the verifier's secret, 32 b!"),
        );
        [
            tokens::refresh("user-0"),
            tokens::refresh("user-1"),
            tokens::refresh("user-2"),
            forged,
        ]
    })
}

pub(super) struct HttpFront {
    service: BoxCloneService<Request<Body>, Response<ResponseBody<Body>>, Infallible>,
    handle: Handle,
}

impl HttpFront {
    pub(super) fn new(registry: &Registry, max_entries: usize) -> Self {
        let verifier = JwtVerifier::hs256(tokens::SECRET)
            .typ(tokens::REFRESH_TYP)
            .build()
            .expect("verifier");
        let layer = limited(
            RefreshCoalesceLayer::http(HttpExtract::new(verifier)),
            max_entries,
        )
        .build();
        let handle = layer.handle();
        let registry = registry.clone();
        let inner = service_fn(move |req: Request<RequestBody<Body>>| {
            let bearer = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            let token = match minted()[..VALID]
                .iter()
                .position(|t| Some(t.as_str()) == bearer)
            {
                Some(token) => token,
                None => {
                    registry.violation(format!("inner call with an unverified token {bearer:?}"));
                    usize::MAX
                }
            };
            let caller = req
                .headers()
                .get("x-caller")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(usize::MAX);
            let result = registry.call(token, caller);
            async move {
                let (status, body) = match result.await {
                    Ok(body) => (StatusCode::OK, body),
                    Err(body) => (StatusCode::INTERNAL_SERVER_ERROR, body),
                };
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .header(header::CONTENT_TYPE, "text/plain")
                        .body(Body::from(body))
                        .expect("response"),
                )
            }
        });
        Self {
            service: BoxCloneService::new(layer.layer(inner)),
            handle,
        }
    }
}

async fn classify(response: Response<ResponseBody<Body>>) -> Outcome {
    let status = response.status();
    let body = match response.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => return Outcome::Other(format!("body error: {error}")),
    };
    let text = String::from_utf8_lossy(&body).into_owned();
    let description = || {
        serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error_description"].as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    match status {
        StatusCode::OK => Outcome::Ok(text),
        StatusCode::INTERNAL_SERVER_ERROR => Outcome::InnerErr(text),
        StatusCode::TOO_MANY_REQUESTS => Outcome::Elapsed,
        StatusCode::UNAUTHORIZED
            if description() == "coalesced call was revoked by an invalidation while it ran" =>
        {
            Outcome::Revoked
        }
        StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED => Outcome::Rejected,
        StatusCode::SERVICE_UNAVAILABLE => match description().as_str() {
            "coalescing table is full" => Outcome::OverEntries,
            "too many callers waiting on one flight" => Outcome::OverWaiters,
            "coalesced call panicked" => Outcome::Panicked,
            "coalesced call exceeded its hard cap and was aborted" => Outcome::HardCap,
            other => Outcome::Other(format!("503 {other}")),
        },
        other => Outcome::Other(format!("{other} {text}")),
    }
}

impl Front for HttpFront {
    /// The valid tokens, a forged one, and no token at all.
    fn kinds(&self) -> usize {
        VALID + 2
    }

    fn spawn(&self, token: usize, caller: usize) -> JoinHandle<Outcome> {
        let service = self.service.clone();
        let mut request = Request::post("/oauth/token").header("x-caller", caller);
        if let Some(token) = minted().get(token) {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(Body::default()).expect("request");
        tokio::spawn(async move {
            match service.oneshot(request).await {
                Ok(response) => classify(response).await,
                Err(never) => match never {},
            }
        })
    }

    fn invalidate(&self, token: usize) -> bool {
        self.handle.invalidate_token(&minted()[token]) > 0
    }

    fn handle(&self) -> &Handle {
        &self.handle
    }
}
