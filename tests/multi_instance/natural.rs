//! Instances keyed by a natural key ([`NaturalKey`]) rather than the HTTP front's token
//! fingerprint: built with one deployment secret, they derive the same key for the same
//! user and coalesce through the store.

use tower_refresh_coalesce::{HttpShare, NaturalKey};

use super::*;

/// The user a request refreshes for.
const USER: &str = "x-user";

/// One instance: a layer keyed by the `x-user` header under `secret`, sharing HTTP responses
/// through `shared`, in front of a handler that counts its calls in `calls` and waits at
/// `gate`.
fn instance(
    shared: &Shared,
    secret: &[u8],
    calls: &Calls,
    gate: &Gate,
) -> (Service, Handle, Option<RedisStore>) {
    let by_user = NaturalKey::new(secret, |r: &Request<Body>| {
        r.headers().get(USER).map(HeaderValue::as_bytes)
    })
    .expect("a 32-byte secret");
    let config = Config::default();
    let builder = RefreshCoalesceLayer::builder(by_user)
        .share(HttpShare::new())
        .ttl(config.ttl)
        .wait_timeout(config.wait_timeout)
        .hard_cap(config.hard_cap);
    let (builder, redis) = match shared {
        Shared::Memory(store) => (builder.store(store.clone()), None),
        Shared::Redis(client) => {
            let store = RedisStore::standalone(client.clone(), SEAL_SECRET)
                .command_timeout(config.command_timeout)
                .build()
                .expect("a RedisStore builds without waiting for Redis");
            (builder.store(store.clone()), Some(store))
        }
        _ => unimplemented!("these cases run in memory and on a standalone server"),
    };
    let layer = builder.build();
    let handle = layer.handle();
    let (calls, gate) = (calls.clone(), gate.clone());
    let inner = service_fn(move |request: Request<Body>| {
        let n = calls.record();
        let open = gate.wait();
        let user = request.headers()[USER].to_str().expect("ascii").to_owned();
        async move {
            open.await;
            let body = json!({"access_token": format!("access-{n}"), "for": user});
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body.to_string()))))
        }
    });
    (BoxCloneService::new(layer.layer(inner)), handle, redis)
}

async fn refresh(service: Service, user: &str) -> (StatusCode, Value) {
    let request = Request::post("/auth/refresh")
        .header(USER, user)
        .body(Body::default())
        .expect("request");
    let seen = respond(service, request).await;
    (seen.status, seen.json())
}

/// Instance A leads alice's refresh, held at the gate; B, built with the same secret,
/// receives alice's request meanwhile and follows A's election instead of calling.
async fn two_instances_with_one_secret_make_one_inner_call_for_a_natural_key(shared: Shared) {
    let (calls, gate) = (Calls::default(), Gate::closed());
    let (a, a_handle, a_redis) = instance(&shared, DEPLOYMENT_SECRET, &calls, &gate);
    let (b, b_handle, b_redis) = instance(&shared, DEPLOYMENT_SECRET, &calls, &gate);
    for store in [&a_redis, &b_redis].into_iter().flatten() {
        timeout(SETTLE, until(|| store.is_subscribed()))
            .await
            .expect("subscribed");
    }

    let first = tokio::spawn(refresh(a, "alice"));
    timeout(SETTLE, until(|| calls.get() == 1))
        .await
        .expect("A calls its inner service");
    let second = tokio::spawn(refresh(b, "alice"));
    timeout(SETTLE, until(|| b_handle.stats().store_lost == 1))
        .await
        .unwrap_or_else(|_| panic!("B lost the election: {:?}", b_handle.stats()));
    gate.open();
    let (first, second) = (first.await.expect("task"), second.await.expect("task"));

    assert_eq!(calls.get(), 1, "one inner call for both instances");
    assert_eq!(first.0, StatusCode::OK);
    assert_eq!(first.1, json!({"access_token": "access-1", "for": "alice"}));
    assert_eq!(second, first, "B answers with A's result");
    let (a, b) = (a_handle.stats(), b_handle.stats());
    assert_eq!((a.leader, a.store_won, a.store_lost), (1, 1, 0), "{a:?}");
    assert_eq!((b.leader, b.store_won, b.store_lost), (1, 0, 1), "{b:?}");
    assert_eq!(b.store_replayed, 1, "{b:?}");
}

/// Another secret is another deployment: its keys differ, so it leads its own call.
async fn an_instance_with_another_secret_does_not_meet_the_first(shared: Shared) {
    let (calls, gate) = (Calls::default(), Gate::open_now());
    let (a, _, _) = instance(&shared, DEPLOYMENT_SECRET, &calls, &gate);
    let (b, _, _) = instance(&shared, b"another deployment secret, 32 B.", &calls, &gate);

    let first = refresh(a, "alice").await;
    let second = refresh(b, "alice").await;

    assert_eq!(calls.get(), 2);
    assert_eq!(first.1["access_token"], "access-1");
    assert_eq!(second.1["access_token"], "access-2");
}

#[tokio::test]
async fn in_memory_two_instances_with_one_secret_make_one_inner_call_for_a_natural_key() {
    two_instances_with_one_secret_make_one_inner_call_for_a_natural_key(memory()).await;
}

#[tokio::test]
async fn on_redis_two_instances_with_one_secret_make_one_inner_call_for_a_natural_key() {
    let server = RedisServer::start();
    two_instances_with_one_secret_make_one_inner_call_for_a_natural_key(on(&server)).await;
}

#[tokio::test]
async fn on_redis_an_instance_with_another_secret_does_not_meet_the_first() {
    let server = RedisServer::start();
    an_instance_with_another_secret_does_not_meet_the_first(on(&server)).await;
}
