//! The gRPC example, driven end to end over real sockets, and its checked-in protobuf code,
//! kept in step with the `.proto`.

use std::{
    env, fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process,
};

use tokio::net::TcpListener;
use tonic::Code;

use grpc::{Counter, TokenServer};

/// The service at 127.0.0.1 on a free port, with the layer in front of its Refresh method.
async fn start() -> (SocketAddr, Counter) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let service = TokenServer::new(grpc::refresh_token_verifier().expect("a valid verifier"));
    let calls = service.calls();
    tokio::spawn(grpc::serve(listener, service));
    (addr, calls)
}

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = env::temp_dir().join(format!("{name}-{}", process::id()));
        fs::create_dir_all(&path).expect("create a temporary directory");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Regenerates `src/refresh.v1.rs` from `proto/refresh.proto` with protox
/// (no system `protoc`) and tonic-prost-build, as it was generated, and compares the bytes.
/// With `REGENERATE=1` it writes the file first.
#[test]
fn the_generated_grpc_code_matches_the_proto() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = crate_dir.join("proto");
    let out = TempDir::new("tower-refresh-coalesce-grpc-codegen");
    let descriptors = protox::compile(["refresh.proto"], [&dir]).expect("refresh.proto compiles");
    tonic_prost_build::configure()
        .out_dir(&out.0)
        .compile_fds(descriptors)
        .expect("code generation succeeds");
    let generated = fs::read(out.0.join("refresh.v1.rs")).expect("the generated file");

    let committed_path = crate_dir.join("src/refresh.v1.rs");
    if env::var_os("REGENERATE").is_some() {
        fs::write(&committed_path, &generated).expect("write the generated file");
    }
    let committed = fs::read(&committed_path).unwrap_or_default();
    if generated != committed {
        let first_difference = generated
            .split(|&b| b == b'\n')
            .zip(committed.split(|&b| b == b'\n'))
            .position(|(new, old)| new != old)
            .map_or_else(
                || "at the end".to_owned(),
                |line| format!("line {}", line + 1),
            );
        panic!(
            "examples/grpc/src/refresh.v1.rs differs from what examples/grpc/proto/refresh.proto \
             generates ({} bytes generated, {} committed; first difference {first_difference}). \
             Regenerate it with\n\n    REGENERATE=1 cargo test -p grpc --test grpc_example \
             the_generated_grpc_code_matches_the_proto\n",
            generated.len(),
            committed.len(),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_grpc_calls_makes_one_inner_call_with_identical_replies() {
    const CALLS: usize = 500;
    let (addr, calls) = start().await;
    let token = grpc::mint_refresh_token(grpc::SECRET, "user-1").expect("mint");

    let report = grpc::storm(addr, &token, CALLS)
        .await
        .expect("the storm runs");

    assert_eq!(calls.get(), 1, "one Refresh call reached the service");
    assert_eq!(report.server_refresh_calls, 1, "the Stats rpc agrees");
    assert_eq!(report.replies.len(), CALLS);
    // Every call succeeded, so every reply carried its `grpc-status` trailer.
    let first = report.replies[0]
        .as_ref()
        .expect("the first call succeeded");
    for (i, reply) in report.replies.iter().enumerate() {
        let reply = reply
            .as_ref()
            .unwrap_or_else(|status| panic!("call {i} failed: {status:?}"));
        assert_eq!(reply, first, "call {i} got another reply");
    }
    assert_eq!((report.ok(), report.distinct_pairs()), (CALLS, 1));

    // The reply is a real rotation: a new refresh token that the service accepts.
    assert_ne!(first.refresh_token, token);
    assert_eq!(first.expires_in, grpc::ACCESS_TTL.as_secs());
    let mut client = grpc::connect(addr).await.expect("connect");
    let next = grpc::refresh(&mut client, Some(&first.refresh_token)).await;
    assert!(next.is_ok(), "the rotated token refreshes: {next:?}");
    assert_eq!(calls.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_without_a_token_is_refused_with_unauthenticated() {
    let (addr, calls) = start().await;
    let mut client = grpc::connect(addr).await.expect("connect");

    let status = grpc::refresh(&mut client, None).await.expect_err("refused");

    // A JSON body would reach tonic as a protocol error, not as this code.
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(calls.get(), 0, "the service was not called");
    // The layer covers only Refresh: Stats needs no token.
    let stats = grpc::server_refresh_calls(&mut client).await;
    assert_eq!(stats.expect("Stats answers"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_token_is_refused_before_the_service() {
    let (addr, calls) = start().await;
    let mut client = grpc::connect(addr).await.expect("connect");
    let forged =
        grpc::mint_refresh_token(b"another secret of at least 32 bytes", "user-1").expect("mint");
    let access = grpc::mint_access_token(grpc::SECRET, "user-1").expect("mint");

    for (what, token) in [("a bad signature", forged), ("an access token", access)] {
        let status = grpc::refresh(&mut client, Some(&token))
            .await
            .expect_err(what);
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
    }
    assert_eq!(calls.get(), 0, "the service was not called");
}
