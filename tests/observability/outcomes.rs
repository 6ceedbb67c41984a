//! The outcome extension: every response carries what the layer did with its request, and
//! the counters agree.

use std::collections::HashMap;

use support::until;

use super::*;

fn form(grant_type: &str) -> Request<Body> {
    Request::post("/auth/refresh")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(format!("grant_type={grant_type}&code=abc")))
        .expect("request")
}

fn spawn_send(front: &Front, token: &str) -> tokio::task::JoinHandle<Answer> {
    let (front, token) = (front.clone(), token.to_owned());
    tokio::spawn(async move { send(&front, bearer(&token)).await })
}

fn outcome(answer: &Answer) -> (Outcome, Option<&'static str>) {
    let coalesced = answer
        .coalesced
        .unwrap_or_else(|| panic!("no outcome extension on {answer:?}"));
    (coalesced.outcome(), coalesced.reason())
}

#[tokio::test(start_paused = true)]
async fn every_response_carries_its_outcome_and_the_counters_agree() {
    let inner = Gated::closed();
    let (front, handle) = front(
        |builder| builder.wait_timeout(Duration::from_secs(2)).max_waiters(2),
        &inner,
    );
    let mut answers = Vec::new();

    // A leader and a caller who joins it; a third caller finds the flight full.
    let alice = tokens::refresh("alice");
    let leader = spawn_send(&front, &alice);
    until(|| handle.stats().leader == 1).await;
    let joined = spawn_send(&front, &alice);
    until(|| handle.stats().joined == 1).await;
    let overloaded = send(&front, bearer(&alice)).await;
    assert_eq!(overloaded.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(outcome(&overloaded), (Outcome::Overloaded, Some("waiters")));
    inner.open();
    let (leader, joined) = (leader.await.unwrap(), joined.await.unwrap());
    assert_eq!(outcome(&leader), (Outcome::Leader, None));
    assert_eq!(outcome(&joined), (Outcome::Joined, None));
    assert_eq!(leader.body, joined.body);

    // A late retry is replayed, byte for byte.
    let replayed = send(&front, bearer(&alice)).await;
    assert_eq!(outcome(&replayed), (Outcome::Replayed, None));
    assert_eq!(replayed.body, leader.body);

    // Refusals carry their reason.
    let missing = send(
        &front,
        Request::post("/auth/refresh")
            .body(Body::default())
            .unwrap(),
    )
    .await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        outcome(&missing),
        (Outcome::Rejected, Some("missing_token"))
    );
    let invalid = send(&front, bearer("not.a.token")).await;
    assert_eq!(invalid.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        outcome(&invalid),
        (Outcome::Rejected, Some("invalid_token"))
    );

    // Another grant type goes straight to the inner service.
    let bypassed = send(&front, form("authorization_code")).await;
    assert_eq!(bypassed.status, StatusCode::OK);
    assert_eq!(outcome(&bypassed), (Outcome::Bypassed, None));

    // The inner service panics for this subject: its flight fails.
    let failed = send(&front, bearer(&tokens::refresh("panic"))).await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(outcome(&failed), (Outcome::LeaderFailed, Some("panicked")));

    answers.extend([
        overloaded, leader, joined, replayed, missing, invalid, bypassed, failed,
    ]);
    let mut counted: HashMap<Outcome, u64> = HashMap::new();
    for answer in &answers {
        *counted.entry(outcome(answer).0).or_default() += 1;
    }
    let stats = handle.stats();
    let count = |o| counted.get(&o).copied().unwrap_or(0);
    for o in Outcome::ALL {
        let expected = match o {
            // `leader` counts the flights started: the failed one was started too.
            Outcome::Leader => count(Outcome::Leader) + count(Outcome::LeaderFailed),
            _ => count(o),
        };
        assert_eq!(stats.outcome(o), expected, "{o}: {stats:?}");
    }
    assert_eq!(inner.calls(), 3, "alice, the bypass and the panic");
}

#[tokio::test(start_paused = true)]
async fn a_caller_who_waits_too_long_gets_429_timed_out() {
    let inner = Gated::closed();
    let (front, handle) = front(|b| b.wait_timeout(Duration::from_secs(2)), &inner);
    let started = tokio::time::Instant::now();
    let answer = send(&front, bearer(&tokens::refresh("bob"))).await;
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        (
            answer.coalesced.unwrap().outcome(),
            answer.coalesced.unwrap().reason()
        ),
        (Outcome::TimedOut, Some("wait_timeout"))
    );
    assert_eq!(handle.stats().timed_out, 1);
    assert_eq!(handle.stats().leader, 1);
}
