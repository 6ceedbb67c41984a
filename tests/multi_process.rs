//! Three reference-server processes, started the way an operator starts them, sharing one
//! SQLite file and one Redis: a storm spread over them rotates the token once.
#![cfg(feature = "redis")]

#[path = "support/redis.rs"]
mod redis_server;

use std::{
    collections::HashSet,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::future::join_all;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use redis_server::RedisServer;
use serde_json::{Value, json};

/// The `server` example, built by `cargo test` next to this test binary.
fn server_binary() -> PathBuf {
    let deps = std::env::current_exe().expect("test binary path");
    let profile = deps
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let binary = profile.join("examples").join("server");
    assert!(
        binary.exists(),
        "{} is missing: `cargo test --all-features` builds it",
        binary.display()
    );
    binary
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("bound").port()
}

/// A server process, killed on drop.
struct Process {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    fn spawn(db: &PathBuf, redis: &str) -> Self {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(server_binary())
            .arg("--addr")
            .arg(addr.to_string())
            .arg("--db")
            .arg(db)
            .arg("--redis")
            .arg(redis)
            // A slow upstream, so that the storm overlaps the refresh on every instance.
            .arg("--refresh-delay-ms")
            .arg("300")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the server starts");
        Self { child, addr }
    }
}

struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Http {
    fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), String> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok((status, body.to_bytes()))
    }

    async fn post_json(&self, addr: SocketAddr, path: &str, body: &Value) -> (StatusCode, Bytes) {
        let request = Request::post(format!("http://{addr}{path}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::from(body.to_string()))
            .expect("request");
        self.send(request).await.expect("the server answers")
    }

    /// Waits until `/healthz` answers (the process is up and listening).
    async fn ready(&self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let request = Request::get(format!("http://{addr}/healthz"))
                .body(Full::default())
                .expect("request");
            if let Ok((StatusCode::OK, _)) = self.send(request).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the server on {addr} never became ready"
            );
            // Polling a process that is still starting: nothing to be woken by.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `refresh_rotations_total` of one server.
    async fn rotations(&self, addr: SocketAddr) -> u64 {
        let request = Request::get(format!("http://{addr}/metrics"))
            .body(Full::default())
            .expect("request");
        let (_, body) = self.send(request).await.expect("metrics");
        let text = String::from_utf8(body.to_vec()).expect("utf-8");
        text.lines()
            .find_map(|line| line.strip_prefix("refresh_rotations_total "))
            .and_then(|value| value.trim().parse().ok())
            .expect("refresh_rotations_total")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_server_processes_sharing_a_database_and_redis_rotate_a_storm_once() {
    let redis = RedisServer::start();
    let db = redis.dir().join("tokens.db");
    let http = Http::new();

    // The first process creates the schema and the shared secret; the others find them.
    let first = Process::spawn(&db, &redis.url());
    http.ready(first.addr).await;
    let others = [
        Process::spawn(&db, &redis.url()),
        Process::spawn(&db, &redis.url()),
    ];
    for process in &others {
        http.ready(process.addr).await;
    }
    let addrs = [first.addr, others[0].addr, others[1].addr];

    let (status, body) = http
        .post_json(
            addrs[0],
            "/auth/login",
            &json!({"username": "demo", "password": "demo"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let login: Value = serde_json::from_slice(&body).expect("json");
    let token = login["refresh_token"]
        .as_str()
        .expect("refresh token")
        .to_owned();

    let mut before = 0;
    for addr in addrs {
        before += http.rotations(addr).await;
    }
    let body = json!({ "refresh_token": token });
    let storm = (0..1_500).map(|i| http.post_json(addrs[i % addrs.len()], "/auth/refresh", &body));
    let replies = join_all(storm).await;
    let mut after = 0;
    for addr in addrs {
        after += http.rotations(addr).await;
    }

    assert!(replies.iter().all(|(status, _)| *status == StatusCode::OK));
    let bodies: HashSet<&Bytes> = replies.iter().map(|(_, body)| body).collect();
    assert_eq!(
        bodies.len(),
        1,
        "every instance answered with the same pair"
    );
    assert_eq!(after - before, 1, "one rotation over the three processes");

    // The new token works on any instance: the processes share the signing secret.
    let pair: Value = serde_json::from_slice(replies[0].1.as_ref()).expect("json");
    let next = pair["refresh_token"].as_str().expect("refresh token");
    let (status, _) = http
        .post_json(addrs[2], "/auth/refresh", &json!({ "refresh_token": next }))
        .await;
    assert_eq!(status, StatusCode::OK);
}
