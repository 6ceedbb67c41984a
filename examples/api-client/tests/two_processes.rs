//! Two `api-client` processes share one credential through a real `redis-server` of the
//! test's own: a storm in both refreshes it once between them.
#![cfg(feature = "redis")]

use std::{process::Stdio, time::Duration};

use api_client::{Login, expired_access_token};
use server::harness::{self, Client, Counters, TestServer};
use support::redis::RedisServer;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdout, Command},
};
use tower_refresh_coalesce::{
    client::{Credentials, Tokens, store::RedisCredentialStore},
    store::RedisStore,
};

const SECRET: &str = "a credential store secret, 32 B!";
const REQUESTS: usize = 200;

struct Worker {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Worker {
    fn spawn(base: &str, redis: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_api-client"))
            .args(["storm", "--base", base, "--redis", redis, "--name", "fleet"])
            .args(["--requests", &REQUESTS.to_string()])
            .env("CREDENTIAL_SECRET", SECRET)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("api-client starts");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Self { child, lines }
    }

    async fn line(&mut self) -> String {
        let line = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
            .await
            .expect("the worker answers within a minute")
            .expect("stdout reads");
        line.expect("a line before the worker exits")
    }

    async fn go(&mut self) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").await.expect("write");
        stdin.flush().await.expect("flush");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_sharing_a_redis_credential_store_refresh_once_between_them() {
    let redis = RedisServer::start();
    let server = TestServer::start(server::Config {
        // The server's own layer is off: only the clients keep the storm to one refresh.
        no_coalesce: true,
        // A slow refresh, so that the other process meets it under way.
        refresh_delay_ms: 300,
        ..harness::config()
    })
    .await
    .expect("the server starts");
    let http = Client::new();
    let login = Login::demo(&http, server.base()).await.expect("login");

    // The login, stored as the fleet's credential; its access token has expired.
    let store = RedisStore::standalone(redis.client(), SECRET)
        .build()
        .expect("store");
    let credentials = Credentials::shared(RedisCredentialStore::new(&store, "fleet"));
    let tokens = Tokens::new(expired_access_token(server.state()).unwrap())
        .unwrap()
        .with_refresh_token(login.refresh_token.as_str());
    assert_eq!(credentials.set(tokens).await.expect("stored"), 1);

    let before = Counters::from_metrics(&http.metrics(server.base()).await.unwrap()).unwrap();
    let mut workers = [
        Worker::spawn(server.base(), &redis.url()),
        Worker::spawn(server.base(), &redis.url()),
    ];
    for worker in &mut workers {
        assert_eq!(
            worker.line().await,
            "ready 1",
            "each loaded the stored credential"
        );
    }
    for worker in &mut workers {
        worker.go().await;
    }
    let mut results = Vec::new();
    for worker in &mut workers {
        let line = worker.line().await;
        results.push(serde_json::from_str::<serde_json::Value>(&line).expect("a JSON line"));
        assert!(worker.child.wait().await.expect("exits").success());
    }

    let metrics = http.metrics(server.base()).await.unwrap();
    let after = Counters::from_metrics(&metrics).unwrap().since(&before);
    assert_eq!(after.rotations, 1, "one refresh between the two processes");
    assert_eq!(after.reuse_detected, 0);
    assert!(!server.family_revoked(&login.refresh_token).await);
    let refreshes: u64 = results
        .iter()
        .map(|r| r["refreshes"].as_u64().unwrap())
        .sum();
    assert_eq!(refreshes, 1, "{results:?}");
    for result in &results {
        assert_eq!(result["ok"], REQUESTS, "{result}");
        assert_eq!(result["generation"], 2, "{result}");
    }
    // The store holds the new pair for the next process.
    assert_eq!(credentials.load().await.unwrap().generation, 2);
}
