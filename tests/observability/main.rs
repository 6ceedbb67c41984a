//! What the layer tells the world: the outcome of every response in its extensions, audit
//! events, span links from joined and replayed requests to the flight, and the
//! OpenTelemetry instruments.

mod audit;
#[cfg(feature = "opentelemetry")]
mod otel;
mod outcomes;
mod spans;

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use support::{Gated, tokens};
use tower::{ServiceExt, util::BoxCloneSyncService};
use tower_refresh_coalesce::{
    AuditEvent, Builder, Coalesced, Handle, HttpExtract, HttpShare, JwtVerifier, Outcome,
    RefreshCoalesceLayer,
    http::{RequestBody, ResponseBody},
};

type Body = Full<Bytes>;
type Front = BoxCloneSyncService<Request<Body>, Response<ResponseBody<Body>>, Infallible>;
type HttpBuilder = Builder<HttpExtract<JwtVerifier>, HttpShare>;

fn verifier() -> JwtVerifier {
    JwtVerifier::hs256(tokens::SECRET)
        .typ(tokens::REFRESH_TYP)
        .build()
        .expect("verifier")
}

/// The HTTP front over a gated inner service that answers `200` with a pair naming the call,
/// or panics for the subject `panic`.
fn front(configure: impl FnOnce(HttpBuilder) -> HttpBuilder, inner: &Gated) -> (Front, Handle) {
    let layer = configure(RefreshCoalesceLayer::http(HttpExtract::new(verifier()))).build();
    let handle = layer.handle();
    let service = inner.service(|request: Request<RequestBody<Body>>, n| async move {
        // A request the layer passed through carries no grant.
        let grant = request
            .extensions()
            .get::<tower_refresh_coalesce::RefreshGrant>();
        let subject = grant.and_then(|g| g.claims()?.subject.as_deref());
        if subject == Some("panic") {
            panic!("the inner service failed");
        }
        Ok::<_, Infallible>(
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(format!(r#"{{"refresh_token":"rotated-{n}"}}"#)))
                .expect("response"),
        )
    });
    (
        BoxCloneSyncService::new(tower::Layer::layer(&layer, service)),
        handle,
    )
}

fn bearer(token: &str) -> Request<Body> {
    Request::post("/auth/refresh")
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Body::default())
        .expect("request")
}

/// A response's status, its outcome extension and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    status: StatusCode,
    coalesced: Option<Coalesced>,
    body: Bytes,
}

async fn send(front: &Front, request: Request<Body>) -> Answer {
    let response = front
        .clone()
        .oneshot(request)
        .await
        .unwrap_or_else(|never| match never {});
    let coalesced = response.extensions().get::<Coalesced>().copied();
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Answer {
        status,
        coalesced,
        body,
    }
}

/// One audit event, owned: its kind, its subject, and its `Debug` form.
type Event = (String, Option<String>, String);

/// Audit events as the hook received them.
#[derive(Clone, Default)]
struct Heard(Arc<Mutex<Vec<Event>>>);

impl Heard {
    /// Hooks `builder` to this record.
    fn hook(&self, builder: HttpBuilder) -> HttpBuilder {
        let heard = self.clone();
        builder.audit(move |event: &AuditEvent<'_>| {
            heard.0.lock().unwrap().push((
                event.kind().to_owned(),
                event.subject().map(str::to_owned),
                format!("{event:?}"),
            ));
        })
    }

    fn kinds(&self) -> Vec<String> {
        self.0.lock().unwrap().iter().map(|e| e.0.clone()).collect()
    }

    fn all(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }
}
