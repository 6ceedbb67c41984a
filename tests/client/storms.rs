//! One refresh per generation, whatever the storm; and everything that can go wrong with it.

use std::time::Duration;

use http::{Request, StatusCode, header::AUTHORIZATION};
use http_body_util::Full;
use support::{Gate, until};
use tower_refresh_coalesce::{
    BoxError,
    client::{
        Credentials, Session, Tokens,
        error::{NoCredentials, Reason, RefreshErrorKind, RefreshFailed},
    },
    error::{Failure, LeaderFailed},
};

use super::{Auth, Failing, body, client, client_with, distinct, get, send, storm};

fn refresh_failed(result: Result<http::Response<Full<bytes::Bytes>>, BoxError>) -> RefreshFailed {
    let error = result.expect_err("the refresh failed");
    error
        .downcast_ref::<RefreshFailed>()
        .unwrap_or_else(|| panic!("a RefreshFailed, got {error}"))
        .clone()
}

fn no_credentials(result: Result<http::Response<Full<bytes::Bytes>>, BoxError>) -> Reason {
    let error = result.expect_err("no credentials");
    error
        .downcast_ref::<NoCredentials>()
        .unwrap_or_else(|| panic!("a NoCredentials, got {error}"))
        .reason()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_rejections_makes_one_refresh_and_every_request_is_sent_again_once() {
    const N: usize = 1_000;
    let auth = Auth::new().gated();
    let credentials = Credentials::from_tokens(auth.login());
    auth.expire_access();
    let client = client(&auth, &credentials);

    let calls = storm(&client, N, "/api");
    // Every request was rejected, and all but the first are waiting on its refresh, which
    // the token server holds.
    until(|| auth.rejections.get() == N && credentials.stats().joined == N as u64 - 1).await;
    assert_eq!(auth.refreshes.get(), 1);
    auth.gate.open();
    for call in calls {
        let response = call.await.unwrap().expect("answered");
        assert_eq!(response.status(), StatusCode::OK);
    }

    assert_eq!(
        auth.refreshes.get(),
        1,
        "one refresh reached the token server"
    );
    assert_eq!(auth.reuse_detected(), 0);
    assert_eq!(credentials.generation(), 2);
    let stats = credentials.stats();
    assert_eq!(stats.refreshes_after_rejection, 1);
    assert_eq!(stats.refreshes_ahead, 0);
    assert_eq!(stats.joined, N as u64 - 1);
    assert_eq!(stats.retried, N as u64);
    let sent = auth.authorizations();
    assert_eq!(sent.len(), 2 * N, "each request sent twice, no more");
    let with = |token: &str| {
        sent.iter()
            .filter(|a| *a == &format!("Bearer {token}"))
            .count()
    };
    assert_eq!((with("access-0"), with("access-1")), (N, N));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_before_a_refresh_and_rejected_after_it_do_not_refresh_again() {
    let auth = Auth::new();
    let credentials = Credentials::from_tokens(auth.login());
    auth.expire_access();
    let hold = Gate::closed();
    let client = client_with(&auth, &credentials, hold.clone(), |b| b);

    // Sent with generation 1, its rejection held by the API.
    let held = tokio::spawn(send(client.clone(), get("/held")));
    until(|| auth.seen.lock().unwrap().len() == 1).await;
    // Another request of generation 1 is rejected and refreshes: generation 2.
    let response = send(client.clone(), get("/api")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!((auth.refreshes.get(), credentials.generation()), (1, 2));

    // Now the first one's rejection arrives: it is sent again with generation 2's token.
    hold.open();
    let response = held.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(auth.refreshes.get(), 1, "no second refresh");
    assert_eq!(auth.reuse_detected(), 0);
    let stats = credentials.stats();
    assert_eq!((stats.stale, stats.retried, stats.refreshes()), (1, 2, 1));
    assert_eq!(
        auth.authorizations(),
        [
            "Bearer access-0",
            "Bearer access-0",
            "Bearer access-1",
            "Bearer access-1"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn an_access_token_is_refreshed_before_it_expires_on_a_paused_clock() {
    let auth = Auth::new().lifetime(Duration::from_secs(600));
    let credentials = Credentials::from_tokens(auth.login().expires_in(Duration::from_secs(100)));
    let client = client_with(&auth, &credentials, Gate::open_now(), |b| {
        b.refresh_ahead(Duration::from_secs(30))
    });

    assert_eq!(
        send(client.clone(), get("/api")).await.unwrap().status(),
        StatusCode::OK
    );
    tokio::time::advance(Duration::from_secs(69)).await; // 31 s left
    assert_eq!(
        send(client.clone(), get("/api")).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(auth.refreshes.get(), 0, "not yet within 30 s of the expiry");

    tokio::time::advance(Duration::from_secs(2)).await; // 29 s left
    for call in storm(&client, 50, "/api") {
        assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(auth.refreshes.get(), 1, "one refresh for the 50 requests");
    assert_eq!(
        auth.rejections.get(),
        0,
        "nothing was sent with a token about to expire"
    );
    let stats = credentials.stats();
    assert_eq!(
        (stats.refreshes_ahead, stats.refreshes_after_rejection),
        (1, 0)
    );
    let sent = auth.authorizations();
    assert_eq!(&sent[..2], ["Bearer access-0", "Bearer access-0"]);
    assert!(sent[2..].iter().all(|a| a == "Bearer access-1"), "{sent:?}");
    assert_eq!(
        credentials.tokens().unwrap().expires_at().unwrap() - tokio::time::Instant::now(),
        Duration::from_secs(600)
    );
}

#[tokio::test(start_paused = true)]
async fn a_short_lived_token_is_refreshed_at_half_its_life_not_on_every_request() {
    let auth = Auth::new().lifetime(Duration::from_secs(40));
    let credentials = Credentials::from_tokens(auth.login().expires_in(Duration::from_secs(40)));
    // The margin (30 s) is more than half the lifetime (20 s): half the lifetime wins.
    let client = client_with(&auth, &credentials, Gate::open_now(), |b| {
        b.refresh_ahead(Duration::from_secs(30))
    });
    tokio::time::advance(Duration::from_secs(19)).await;
    send(client.clone(), get("/api")).await.unwrap();
    assert_eq!(auth.refreshes.get(), 0);
    tokio::time::advance(Duration::from_secs(2)).await;
    send(client.clone(), get("/api")).await.unwrap();
    send(client.clone(), get("/api")).await.unwrap();
    assert_eq!(
        auth.refreshes.get(),
        1,
        "the new 40 s token is not refreshed at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_ends_the_credentials_after_exactly_one_attempt() {
    const N: usize = 100;
    let auth = Auth::new().gated();
    auth.fail_next(&[Failing::InvalidGrant]);
    let credentials = Credentials::from_tokens(auth.login());
    auth.expire_access();
    let client = client(&auth, &credentials);

    let calls = storm(&client, N, "/api");
    until(|| auth.rejections.get() == N && credentials.stats().joined == N as u64 - 1).await;
    auth.gate.open();
    for call in calls {
        // The rejection is the answer: the session is over.
        let response = call.await.unwrap().expect("the rejection, not an error");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(auth.refreshes.get(), 1, "one attempt");
    assert!(matches!(
        credentials.snapshot().session,
        Session::Ended(Reason::Refused)
    ));
    assert_eq!(credentials.stats().invalid_grant, 1);
    assert_eq!(credentials.stats().retried, 0);

    // Later requests fail at once, and nothing reaches the API or the token server.
    for _ in 0..3 {
        let reason = no_credentials(send(client.clone(), get("/api")).await);
        assert_eq!(reason, Reason::Refused);
    }
    assert_eq!(auth.seen.lock().unwrap().len(), N);
    assert_eq!(auth.refreshes.get(), 1, "never a loop");
}

#[tokio::test(start_paused = true)]
async fn a_transient_failure_reaches_the_waiters_and_the_next_attempt_backs_off() {
    let auth = Auth::new();
    auth.fail_next(&[Failing::Transient, Failing::Transient]);
    let credentials = Credentials::from_tokens(auth.login());
    auth.expire_access();
    let client = client_with(&auth, &credentials, Gate::open_now(), |b| {
        b.backoff(Duration::from_secs(1), Duration::from_secs(4))
            .backoff_jitter(0.0)
    });

    let failed = refresh_failed(send(client.clone(), get("/api")).await);
    assert_eq!(failed.kind(), RefreshErrorKind::Transient);
    assert_eq!(failed.retry_after(), Duration::from_secs(1));
    assert_eq!(auth.refreshes.get(), 1);
    // Within the back-off, a rejected request fails at once: no call of the token server.
    let failed = refresh_failed(send(client.clone(), get("/api")).await);
    assert_eq!(failed.retry_after(), Duration::from_secs(1));
    assert_eq!(auth.refreshes.get(), 1);

    tokio::time::advance(Duration::from_secs(1)).await;
    let failed = refresh_failed(send(client.clone(), get("/api")).await);
    assert_eq!(failed.retry_after(), Duration::from_secs(2), "doubled");
    assert_eq!(auth.refreshes.get(), 2);

    tokio::time::advance(Duration::from_secs(2)).await;
    let response = send(client.clone(), get("/api")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(auth.refreshes.get(), 3);
    assert_eq!(credentials.stats().failed, 2);
    assert_eq!(auth.reuse_detected(), 0, "a failed refresh rotated nothing");
}

#[tokio::test(start_paused = true)]
async fn the_back_off_doubles_up_to_its_bound() {
    let auth = Auth::new();
    auth.fail_next(&[Failing::Transient; 6]);
    let credentials = Credentials::from_tokens(auth.login());
    auth.expire_access();
    let client = client_with(&auth, &credentials, Gate::open_now(), |b| {
        b.backoff(Duration::from_secs(1), Duration::from_secs(4))
            .backoff_jitter(0.0)
    });
    let mut waits = Vec::new();
    for _ in 0..6 {
        let failed = refresh_failed(send(client.clone(), get("/api")).await);
        waits.push(failed.retry_after().as_secs());
        tokio::time::advance(failed.retry_after()).await;
    }
    assert_eq!(waits, [1, 2, 4, 4, 4, 4]);
    assert_eq!(auth.refreshes.get(), 6, "one attempt per back-off");
}

#[tokio::test(start_paused = true)]
async fn the_jittered_back_off_is_held_exactly_as_long_as_it_says() {
    let auth = Auth::new();
    auth.fail_next(&[Failing::Transient; 4]);
    let credentials = Credentials::from_tokens(auth.login());
    auth.expire_access();
    // The default jitter: each wait is between half and all of its doubled delay.
    let client = client_with(&auth, &credentials, Gate::open_now(), |b| {
        b.backoff(Duration::from_secs(8), Duration::from_secs(64))
    });
    for (attempt, full) in [8u64, 16, 32, 64].into_iter().enumerate() {
        let failed = refresh_failed(send(client.clone(), get("/api")).await);
        let wait = failed.retry_after();
        let full = Duration::from_secs(full);
        assert!(
            full / 2 <= wait && wait <= full,
            "{wait:?} outside [{:?}, {full:?}]",
            full / 2
        );
        assert_eq!(auth.refreshes.get(), attempt + 1);
        // Until the wait is over, a rejected request fails at once without an attempt.
        tokio::time::advance(wait - Duration::from_millis(1)).await;
        let again = refresh_failed(send(client.clone(), get("/api")).await);
        assert_eq!(again.retry_after(), wait, "the same failure");
        assert_eq!(auth.refreshes.get(), attempt + 1);
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    let response = send(client.clone(), get("/api")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(auth.refreshes.get(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_panics_fails_its_waiters_without_panicking_them() {
    const N: usize = 20;
    let auth = Auth::new().gated();
    auth.fail_next(&[Failing::Panic]);
    let credentials = Credentials::from_tokens(auth.login());
    auth.expire_access();
    let client = client(&auth, &credentials);
    let calls = storm(&client, N, "/api");
    until(|| auth.rejections.get() == N && credentials.stats().joined == N as u64 - 1).await;
    auth.gate.open();
    for call in calls {
        let failed = refresh_failed(call.await.expect("the caller did not panic"));
        let source = std::error::Error::source(&failed).expect("a source");
        let leader = source.downcast_ref::<LeaderFailed>().expect("LeaderFailed");
        assert_eq!(leader.failure(), Failure::Panicked);
    }
    assert_eq!(auth.refreshes.get(), 1);
    // The flight is gone: the next request refreshes.
    let response = send(client.clone(), get("/api")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(auth.refreshes.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_refresh_that_hangs_fails_after_the_refresh_timeout() {
    let auth = Auth::new().gated(); // never opened
    let credentials = Credentials::from_tokens(auth.login());
    auth.expire_access();
    let client = client_with(&auth, &credentials, Gate::open_now(), |b| {
        b.refresh_timeout(Duration::from_secs(2))
    });
    let started = tokio::time::Instant::now();
    let failed = refresh_failed(send(client.clone(), get("/api")).await);
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(failed.kind(), RefreshErrorKind::Transient);
    let chain = tower_refresh_coalesce_error_chain(&failed);
    assert!(chain.contains("waited 2s"), "{chain}");
}

fn tower_refresh_coalesce_error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(next) = source {
        text = format!("{text}: {next}");
        source = next.source();
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_runs_to_its_end_when_every_request_that_waited_for_it_is_dropped() {
    let auth = Auth::new().gated();
    let credentials = Credentials::from_tokens(auth.login());
    auth.expire_access();
    let client = client(&auth, &credentials);
    let calls = storm(&client, 10, "/api");
    until(|| auth.rejections.get() == 10 && credentials.stats().joined == 9).await;
    for call in &calls {
        call.abort();
    }
    for call in calls {
        assert!(call.await.unwrap_err().is_cancelled());
    }
    auth.gate.open();
    until(|| credentials.generation() == 2).await;
    // The rotated pair was kept: the next request uses it, no second refresh.
    let response = send(client.clone(), get("/api")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(auth.refreshes.get(), 1);
    assert_eq!(auth.reuse_detected(), 0);
}

#[tokio::test]
async fn requests_without_credentials_fail_without_being_sent() {
    let auth = Auth::new();
    let empty = Credentials::new();
    let reason = no_credentials(send(client(&auth, &empty), get("/api")).await);
    assert_eq!(reason, Reason::Empty);

    let credentials = Credentials::from_tokens(auth.login());
    let client = client(&auth, &credentials);
    assert_eq!(
        send(client.clone(), get("/api")).await.unwrap().status(),
        StatusCode::OK
    );
    credentials.clear().await.unwrap();
    assert_eq!(credentials.generation(), 2);
    let reason = no_credentials(send(client.clone(), get("/api")).await);
    assert_eq!(reason, Reason::Cleared);
    assert_eq!(
        auth.seen.lock().unwrap().len(),
        1,
        "only the request before the logout"
    );
    assert_eq!(auth.refreshes.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_during_a_request_answers_its_rejection_without_a_refresh() {
    let auth = Auth::new();
    let credentials = Credentials::from_tokens(auth.login());
    auth.expire_access();
    let hold = Gate::closed();
    let client = client_with(&auth, &credentials, hold.clone(), |b| b);
    let held = tokio::spawn(send(client.clone(), get("/held")));
    until(|| auth.seen.lock().unwrap().len() == 1).await;

    // The user logs in again meanwhile (here: the token server's current pair, as a
    // login would hand it out).
    let login = auth.refresh_now();
    assert_eq!(credentials.set(login).await.unwrap(), 2);
    hold.open();
    let response = held.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(credentials.stats().stale, 1);
    assert_eq!(credentials.stats().refreshes(), 0);
}

#[tokio::test]
async fn a_request_with_its_own_authorization_is_passed_on_untouched() {
    let auth = Auth::new();
    let credentials = Credentials::from_tokens(auth.login());
    auth.expire_access();
    let client = client(&auth, &credentials);
    let request = Request::get("/api")
        .header(AUTHORIZATION, "Bearer chosen-by-the-caller")
        .body(Full::default())
        .unwrap();
    let response = send(client, request).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(auth.authorizations(), ["Bearer chosen-by-the-caller"]);
    assert_eq!(auth.refreshes.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trailers_only_grpc_unauthenticated_is_a_rejection_too() {
    const N: usize = 50;
    let auth = Auth::new().grpc().gated();
    let credentials = Credentials::from_tokens(auth.login());
    auth.expire_access();
    let client = client(&auth, &credentials);
    let calls = storm(&client, N, "/refresh.v1.AccountService/Me");
    until(|| auth.rejections.get() == N && credentials.stats().joined == N as u64 - 1).await;
    auth.gate.open();
    for call in calls {
        let response = call.await.unwrap().unwrap();
        assert!(response.headers().get("grpc-status").is_none(), "answered");
        assert_eq!(body(response).await, "");
    }
    assert_eq!(auth.refreshes.get(), 1);
    assert_eq!(distinct(auth.authorizations()), 2);
}

#[test]
fn access_tokens_that_cannot_be_sent_are_refused_with_a_reason() {
    for (token, reason) in [
        ("", "it is empty"),
        ("two words", "only visible ASCII without spaces is allowed"),
        ("tab\there", "only visible ASCII without spaces is allowed"),
        ("é", "only visible ASCII without spaces is allowed"),
    ] {
        assert_eq!(
            Tokens::new(token).unwrap_err().reason(),
            reason,
            "{token:?}"
        );
    }
    assert!(Tokens::new("x".repeat(16 * 1024 + 1)).is_err());
    assert!(Tokens::new("eyJhbGciOiJIUzI1NiJ9.e30.sig-_~+/=").is_ok());
}
