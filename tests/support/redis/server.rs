//! A standalone `redis-server` (see the module docs of [`super`]).

use std::{
    collections::BTreeMap,
    ffi::OsString,
    path::Path,
    process::{Child, Command},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Instant,
};

use super::{
    inspect,
    process::{self, Launch, POLL_INTERVAL, START_TIMEOUT, TempDir},
};

/// How many free ports `start` tries when the chosen one is taken before redis binds it.
const PORT_ATTEMPTS: usize = 5;

/// A `redis-server` child process listening on `127.0.0.1:port`.
///
/// Dropping it resumes the server if paused, kills it (SIGKILL), waits for it to exit and
/// removes its directory. If the test is panicking, the tail of the log is printed first.
#[derive(Debug)]
pub struct RedisServer {
    bin: OsString,
    /// Arguments placed before the harness's own (see `start_with_args`).
    args: Vec<OsString>,
    port: u16,
    /// `None` once `kill` has run, until `restart`.
    child: Option<Child>,
    paused: AtomicBool,
    /// Dropped after `Drop::drop` has killed the child.
    dir: TempDir,
}

impl RedisServer {
    /// Starts `$REDIS_SERVER_BIN` (else `redis-server` from `PATH`) on a free port and waits
    /// until it answers `PING`.
    ///
    /// # Panics
    ///
    /// If the binary is missing, the server exits, or it does not answer within
    /// [`START_TIMEOUT`]; the message carries the tail of the server log.
    pub fn start() -> Self {
        Self::start_with(process::binary())
    }

    /// Like [`start`](Self::start), with an explicit binary (a path, or a name looked up in
    /// `PATH`).
    pub fn start_with(bin: impl Into<OsString>) -> Self {
        Self::start_with_args(bin, Vec::<OsString>::new())
    }

    /// Like [`start_with`](Self::start_with), with arguments placed before the harness's
    /// own (`--port`, `--bind`, `--save`, `--appendonly`, `--daemonize`, `--dir`,
    /// `--logfile`, which therefore win): a configuration file first if any (`sentinel.conf`,
    /// `--sentinel`), then `--name value` pairs (`--cluster-enabled yes`, `--replicaof ..`).
    /// `restart` runs the server with the same arguments. A relative file name in them
    /// (`--cluster-config-file nodes.conf`) lands in [`dir`](Self::dir).
    pub fn start_with_args<A: Into<OsString>>(
        bin: impl Into<OsString>,
        args: impl IntoIterator<Item = A>,
    ) -> Self {
        let bin = bin.into();
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let dir = TempDir::new();
        let mut refused = String::new();
        for _ in 0..PORT_ATTEMPTS {
            // The port is free now, but anyone may take it before redis binds it: then redis
            // exits with "Address already in use" and we try another one.
            let port = process::free_port();
            let deadline = Instant::now() + START_TIMEOUT;
            match process::launch(&bin, &args, dir.path(), port, deadline) {
                Launch::Ready(child) => {
                    return Self {
                        bin,
                        args,
                        port,
                        child: Some(child),
                        paused: AtomicBool::new(false),
                        dir,
                    };
                }
                Launch::PortTaken(report) => refused = report,
            }
        }
        panic!(
            "redis-server could not bind a free port in {PORT_ATTEMPTS} attempts; last log:\n{refused}"
        );
    }

    /// `redis://127.0.0.1:<port>/`. The port stays the same across `restart`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id of the running server, `None` after `kill`.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's own directory (its `--dir`, holding `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of the server log (every run since `start`).
    pub fn log_tail(&self) -> String {
        process::report(self.dir.path(), 0)
    }

    /// A client for [`url`](Self::url); connecting is up to the caller, with redis-rs's
    /// default timeouts.
    pub fn client(&self) -> ::redis::Client {
        ::redis::Client::open(self.url()).expect("a 127.0.0.1 redis URL is valid")
    }

    /// A fresh multiplexed connection for assertions, without connection or response
    /// timeout (see the module docs).
    ///
    /// # Panics
    ///
    /// If the server refuses the connection (for example after `kill`).
    pub async fn connection(&self) -> ::redis::aio::MultiplexedConnection {
        let config = ::redis::AsyncConnectionConfig::new()
            .set_connection_timeout(None)
            .set_response_timeout(None);
        self.client()
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to redis-server at {}: {e}", self.url()))
    }

    /// Kills the server with SIGKILL (no shutdown, no save) and waits for it to exit.
    /// Does nothing if it is not running. Works on a paused server too.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `Child::kill` is SIGKILL on Unix, which also ends a stopped process.
            if let Err(e) = child.kill() {
                panic!("cannot SIGKILL redis-server {}: {e}", child.id());
            }
            if let Err(e) = child.wait() {
                panic!("cannot wait for redis-server {}: {e}", child.id());
            }
            self.paused.store(false, Ordering::SeqCst);
        }
    }

    /// Starts the server again on the same port with an empty dataset, killing it first if
    /// it is still running, and waits until it answers `PING`.
    ///
    /// # Panics
    ///
    /// If another process holds the port for all of [`START_TIMEOUT`], or as `start`.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match process::launch(&self.bin, &self.args, self.dir.path(), self.port, deadline) {
                Launch::Ready(child) => {
                    self.child = Some(child);
                    return;
                }
                // Someone (say another test probing for a free port) holds our port for a
                // moment: there is no other port to go to, so wait for it.
                Launch::PortTaken(_) if Instant::now() < deadline => {
                    thread::sleep(POLL_INTERVAL * 5);
                }
                Launch::PortTaken(report) => panic!(
                    "cannot restart redis-server: port {} stayed taken for {START_TIMEOUT:?}; log:\n{report}",
                    self.port
                ),
            }
        }
    }

    /// Stops the server with SIGSTOP and returns once the kernel reports it stopped.
    /// Connections stay open; requests are queued unanswered until `resume`.
    pub fn pause(&self) {
        let pid = self.running_pid();
        process::signal(pid, "-STOP");
        self.paused.store(true, Ordering::SeqCst);
        process::await_state(pid, |state| state == 'T', "stopped");
    }

    /// Continues a paused server with SIGCONT; it answers queued requests right away.
    pub fn resume(&self) {
        let pid = self.running_pid();
        process::signal(pid, "-CONT");
        self.paused.store(false, Ordering::SeqCst);
        process::await_state(pid, |state| state != 'T', "running");
    }

    /// `CLIENT KILL TYPE pubsub` through a fresh connection: closes every connection that is
    /// subscribed to a channel or pattern. Returns how many were closed.
    pub async fn kill_pubsub_clients(&self) -> usize {
        let mut con = self.connection().await;
        ::redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut con)
            .await
            .unwrap_or_else(|e| panic!("CLIENT KILL TYPE pubsub failed: {e}"))
    }

    /// Every key as `(key, PTTL in ms, value)`, sorted by key.
    ///
    /// PTTL is `-1` for a key without expiry. The value is the bytes of a string; for other
    /// types the elements joined by `,`: a set's members sorted, a list's and a sorted set's
    /// elements in order, a hash's `field=value` pairs sorted; any other type (stream, ...)
    /// gives its type name in angle brackets, e.g. `<stream>`. This is not an atomic
    /// snapshot: a key that expires while the dump runs is left out.
    pub async fn dump(&self) -> Vec<(Vec<u8>, i64, Vec<u8>)> {
        inspect::dump(&mut self.connection().await).await
    }

    /// `INFO commandstats` as command name -> calls, names lowercase as Redis reports them
    /// (`set`, `client|kill`). Counts include the harness's own commands: `ping` and `info`
    /// from each readiness probe, and those of earlier `dump` / `command_stats` calls (this
    /// call's `INFO` is counted only from the next call on). `restart` resets them.
    pub async fn command_stats(&self) -> BTreeMap<String, u64> {
        inspect::command_stats(&mut self.connection().await).await
    }

    fn running_pid(&self) -> u32 {
        match &self.child {
            Some(child) => child.id(),
            None => panic!("redis-server on port {} is not running (killed)", self.port),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- redis-server log (127.0.0.1:{}, {}) ---\n{}",
                self.port,
                self.dir.path().display(),
                self.log_tail()
            );
        }
        if self.child.is_some() && self.paused.load(Ordering::SeqCst) {
            // SIGKILL alone would do, but leave nothing stopped behind if it fails.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(self.running_pid().to_string())
                .status();
        }
        if let Some(mut child) = self.child.take() {
            // No panics here: we may be unwinding already.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
