//! Redis processes of the test's own: started on a free loopback port, killed on drop.
//!
//! - [`RedisServer`] (`server.rs`): one standalone `redis-server`, which a test can kill,
//!   restart, pause (SIGSTOP) and resume, and whose keys and command counts it can read.
//! - `process.rs`: what any Redis process of a test needs, whatever its topology: the
//!   binary, a free port, a directory of its own, start-up until it answers `PING`, the log
//!   tail for failure messages, signals. A cluster or a Sentinel set-up is a module beside
//!   `server.rs` built on it.
//! - `inspect.rs`: reading a server's keys and command counts for assertions.
//! - [`RedisCluster`] (`cluster.rs`): a Redis Cluster of `redis-server --cluster-enabled
//!   yes` nodes (3 masters, optionally a replica each), with failover, restart and per-node
//!   helpers.
//! - [`RedisSentinel`] (`sentinel.rs`): a master, a replica and three sentinels, with
//!   failover and restart.
//!
//! Conventions, for every topology:
//!
//! - The binary is `$REDIS_SERVER_BIN`, else `redis-server` from `PATH`. A missing binary
//!   panics with a message that says how to install it.
//! - A server runs with `--save "" --appendonly no`, binds 127.0.0.1 only, and keeps its
//!   log in a temporary directory of its own (`$TMPDIR/rc-redis-<pid>-<n>/redis.log`).
//! - Starting and restarting are synchronous: they block the calling thread until the
//!   server answers `PING` (bounded by [`START_TIMEOUT`]). From a `#[tokio::test]` that is
//!   a few milliseconds of blocking, which is harmless; the async helpers need a tokio
//!   runtime.
//! - The helpers' own connections (`connection`, `dump`, ...) have no connection or
//!   response timeout, so they also work in tests with tokio's paused clock (which would
//!   auto-advance to any timer while the runtime waits on the socket). While a server is
//!   paused they wait; put your own `tokio::time::timeout` around them if that matters.

pub mod cluster;
mod inspect;
mod process;
pub mod sentinel;
mod server;

pub use cluster::RedisCluster;
pub use process::{BIN_ENV, START_TIMEOUT, blocking_connection};
pub use sentinel::RedisSentinel;
pub use server::RedisServer;
