//! The client layer in front of a tonic client, over real sockets: a storm of calls with an
//! expired access token refreshes once.

use std::net::SocketAddr;

use grpc::{
    SECRET, TokenServer,
    account::{AccountCounters, mint_expired_access_token},
    bearer::me_storm,
};
use tokio::net::TcpListener;
use tonic::Code;
use tower_refresh_coalesce::client::{
    Credentials, Session, Tokens,
    error::{NoCredentials, Reason},
};

/// The token and account services at 127.0.0.1 on a free port.
async fn start() -> (SocketAddr, TokenServer, AccountCounters) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let service = TokenServer::new(grpc::refresh_token_verifier().expect("a valid verifier"));
    let account = service.account();
    tokio::spawn(grpc::serve(listener, service.clone()));
    (addr, service, account)
}

fn credentials(refresh_token: String) -> Credentials {
    let expired = mint_expired_access_token(SECRET, "user-1").expect("mint");
    Credentials::from_tokens(
        Tokens::new(expired)
            .expect("an access token")
            .with_refresh_token(refresh_token),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_calls_with_an_expired_access_token_refreshes_once() {
    const CALLS: usize = 1_000;
    let (addr, service, account) = start().await;
    let credentials = credentials(grpc::mint_refresh_token(SECRET, "user-1").expect("mint"));

    let report = me_storm(addr, credentials.clone(), CALLS)
        .await
        .expect("the storm runs");

    for (i, reply) in report.replies.iter().enumerate() {
        let reply = reply
            .as_ref()
            .unwrap_or_else(|status| panic!("call {i} failed: {status:?}"));
        assert_eq!(reply.subject, "user-1");
    }
    assert_eq!(report.refreshes, 1, "one Refresh call left the client");
    assert_eq!(service.calls().get(), 1, "one reached the token service");
    assert_eq!(account.me.get(), CALLS as u64, "every call answered once");
    // Each call the interceptor refused (trailers-only) was sent again once; a call that
    // left after the refresh went with the new token at once.
    let stats = credentials.stats();
    assert!(account.rejected.get() >= 1);
    assert_eq!(stats.retried, account.rejected.get());
    assert_eq!(stats.refreshes_after_rejection, 1);
    assert_eq!(credentials.generation(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_refresh_token_ends_the_credentials_after_one_attempt() {
    const CALLS: usize = 200;
    let (addr, service, account) = start().await;
    let forged =
        grpc::mint_refresh_token(b"not the service's secret, 32+ bytes", "user-1").expect("mint");
    let credentials = credentials(forged);

    let report = me_storm(addr, credentials.clone(), CALLS)
        .await
        .expect("the storm runs");

    let (mut rejected, mut never_sent) = (0u64, 0);
    for reply in &report.replies {
        let status = reply.as_ref().expect_err("refused");
        // Every call fails with the code a refused call gets.
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        match std::error::Error::source(status) {
            // Sent, refused by the interceptor, and answered with that refusal.
            None => rejected += 1,
            // Called once the credentials had ended: never sent; the layer's error is the
            // status's source.
            Some(source) => {
                let no = source
                    .downcast_ref::<NoCredentials>()
                    .expect("NoCredentials");
                assert_eq!(no.reason(), Reason::Refused);
                never_sent += 1;
            }
        }
    }
    assert_eq!(rejected as usize + never_sent, CALLS);
    assert_eq!(report.refreshes, 1, "one attempt, never a loop");
    assert_eq!(
        service.calls().get(),
        0,
        "the server's layer refused the forged token"
    );
    assert!(rejected >= 1);
    assert_eq!(account.rejected.get(), rejected, "no call was sent twice");
    assert!(matches!(
        credentials.snapshot().session,
        Session::Ended(Reason::Refused)
    ));

    // Calls made once the credentials have ended are not sent, and fail as a refused
    // call does: `UNAUTHENTICATED`, with the layer's error as the status's source.
    let later = me_storm(addr, credentials.clone(), 10)
        .await
        .expect("the calls run");
    for reply in &later.replies {
        let status = reply.as_ref().expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        let source = std::error::Error::source(status).expect("the layer's error");
        let no = source
            .downcast_ref::<NoCredentials>()
            .expect("NoCredentials");
        assert_eq!(no.reason(), Reason::Refused);
    }
    assert_eq!(later.refreshes, 0);
    assert_eq!(account.rejected.get(), rejected, "nothing more was sent");
}
