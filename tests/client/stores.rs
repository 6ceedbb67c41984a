//! Cells sharing a credential store (in memory) refresh once between them.

use std::time::Duration;

use http::StatusCode;
use support::{Gate, until};
use tokio::time::Instant;
use tower_refresh_coalesce::{
    client::{
        Credentials, Session, Snapshot,
        error::{NoCredentials, Reason, RefreshErrorKind, RefreshFailed},
        store::{CredentialStore, MemoryCredentialStore, Swapped},
    },
    store::{Fence, StoreError, StoreErrorKind, StoreFuture},
};

use super::{Auth, Failing, client, client_with, get, send, storm};

/// Two cells over one store, logged in with `auth`'s first pair through `a`; `b` has
/// loaded it with a request the API accepted.
async fn two_cells(auth: &Auth) -> (Credentials, Credentials) {
    let store = MemoryCredentialStore::new();
    let a = Credentials::shared(store.clone());
    let b = Credentials::shared(store);
    assert_eq!(a.set(auth.login()).await.unwrap(), 1);
    let warm = send(client(auth, &b), get("/api")).await.unwrap();
    assert_eq!(warm.status(), StatusCode::OK);
    assert_eq!(b.generation(), 1);
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cells_sharing_a_store_refresh_once_between_them() {
    const N: usize = 100;
    let auth = Auth::new().gated();
    let (a, b) = two_cells(&auth).await;
    // `b` took the login from the store.
    assert_eq!(b.stats().adopted, 1);
    auth.expire_access();
    let mut calls = storm(&client(&auth, &a), N, "/api");
    calls.extend(storm(&client(&auth, &b), N, "/api"));
    until(|| {
        auth.rejections.get() == 2 * N
            && a.stats().joined == N as u64 - 1
            && b.stats().joined == N as u64 - 1
    })
    .await;
    // Both cells' flights are under way: one holds the store's lock and the token server
    // holds its refresh; the other waits for the store.
    assert_eq!(auth.refreshes.get(), 1);
    auth.gate.open();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(auth.refreshes.get(), 1, "one refresh between the two cells");
    assert_eq!(auth.reuse_detected(), 0);
    assert_eq!((a.generation(), b.generation()), (2, 2));
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(sa.refreshes() + sb.refreshes(), 1);
    assert_eq!(
        sa.adopted + sb.adopted,
        2,
        "the other cell took the stored result"
    );
}

#[tokio::test]
async fn a_login_through_one_cell_is_taken_by_the_others_without_a_refresh() {
    let auth = Auth::new();
    let (a, b) = two_cells(&auth).await;
    auth.expire_access();
    let login = auth.refresh_now();
    assert_eq!(a.set(login).await.unwrap(), 2);
    // `b` still sends its old token, is rejected, and finds the new one in the store.
    let response = send(client(&auth, &b), get("/api")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(b.generation(), 2);
    assert_eq!(b.stats().adopted, 2, "the first login, then the second");
    assert_eq!(auth.refreshes.get(), 0);
}

#[tokio::test]
async fn invalid_grant_in_one_cell_ends_the_credentials_of_every_cell() {
    let auth = Auth::new();
    let (a, b) = two_cells(&auth).await;
    auth.expire_access();
    auth.fail_next(&[Failing::InvalidGrant]);
    let response = send(client(&auth, &a), get("/api")).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(matches!(
        a.snapshot().session,
        Session::Ended(Reason::Refused)
    ));

    let client_b = client(&auth, &b);
    let response = send(client_b.clone(), get("/api")).await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "its rejection, as it is"
    );
    assert!(matches!(
        b.snapshot().session,
        Session::Ended(Reason::Refused)
    ));
    let error = send(client_b, get("/api")).await.unwrap_err();
    assert_eq!(
        error.downcast_ref::<NoCredentials>().unwrap().reason(),
        Reason::Refused
    );
    assert_eq!(auth.refreshes.get(), 1, "one attempt between the two cells");
}

#[tokio::test(start_paused = true)]
async fn a_lock_whose_holder_died_is_taken_again_once_its_lease_ends() {
    let auth = Auth::new();
    let (a, _b) = two_cells(&auth).await;
    auth.expire_access();
    // A process took the lock and died: its lease runs 35 s.
    let store = MemoryCredentialStore::new();
    let a2 = Credentials::shared(store.clone());
    a2.set(auth.login()).await.unwrap();
    assert!(
        store
            .lock(&Fence::random(), Duration::from_secs(35))
            .await
            .unwrap()
    );
    drop(a);

    let started = Instant::now();
    let client = client_with(&auth, &a2, Gate::open_now(), |b| {
        b.refresh_timeout(Duration::from_secs(30))
    });
    let response = send(client, get("/api")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_secs(35),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(auth.refreshes.get(), 1);
    assert_eq!(a2.generation(), 2);
}

/// A store that fails every command.
#[derive(Debug)]
struct Unreachable;

impl Unreachable {
    fn error() -> StoreError {
        StoreError::with_kind(StoreErrorKind::Unreachable, "connection refused")
    }
}

impl CredentialStore for Unreachable {
    fn load(&self) -> StoreFuture<'_, Option<Snapshot>> {
        Box::pin(async { Err(Self::error()) })
    }
    fn swap<'a>(&'a self, _: u64, _: &'a Snapshot) -> StoreFuture<'a, Swapped> {
        Box::pin(async { Err(Self::error()) })
    }
    fn lock<'a>(&'a self, _: &'a Fence, _: Duration) -> StoreFuture<'a, bool> {
        Box::pin(async { Err(Self::error()) })
    }
    fn unlock<'a>(&'a self, _: &'a Fence) -> StoreFuture<'a, ()> {
        Box::pin(async { Err(Self::error()) })
    }
    fn wait(&self, _: u64, _: Instant) -> StoreFuture<'_, Option<Snapshot>> {
        Box::pin(async { Err(Self::error()) })
    }
}

#[tokio::test]
async fn an_unreachable_store_fails_the_request_and_nothing_refreshes_alone() {
    let auth = Auth::new();
    let credentials = Credentials::shared(Unreachable);
    let error = credentials.set(auth.login()).await.unwrap_err();
    assert_eq!(error.kind(), StoreErrorKind::Unreachable);
    let error = send(client(&auth, &credentials), get("/api"))
        .await
        .unwrap_err();
    let failed = error
        .downcast_ref::<RefreshFailed>()
        .expect("a RefreshFailed");
    assert_eq!(failed.kind(), RefreshErrorKind::Transient);
    assert_eq!(auth.refreshes.get(), 0);
    assert!(auth.seen.lock().unwrap().is_empty());
}
