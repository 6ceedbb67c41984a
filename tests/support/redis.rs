//! A `redis-server` of the test's own: started on a free loopback port, killed on drop.
//!
//! Include it with `#[path = "support/redis.rs"] mod redis_server;` from a test file gated
//! on `#![cfg(feature = "redis")]` (the module gates itself too).
//!
//! - The binary is `$REDIS_SERVER_BIN`, else `redis-server` from `PATH`. A missing binary
//!   panics with a message that says how to install it.
//! - The server runs with `--save "" --appendonly no`, binds 127.0.0.1 only, and keeps its
//!   log in a temporary directory of its own (`$TMPDIR/rc-redis-<pid>-<n>/redis.log`).
//! - Starting and restarting are synchronous: they block the calling thread until the
//!   server answers `PING` (bounded by [`START_TIMEOUT`]). From a `#[tokio::test]` that is
//!   a few milliseconds of blocking, which is harmless; the async helpers below need a
//!   tokio runtime.
//! - The helpers' own connections (`connection`, `dump`, ...) have no connection or
//!   response timeout, so they also work in tests with tokio's paused clock (which would
//!   auto-advance to any timer while the runtime waits on the socket). While the server is
//!   paused they wait; put your own `tokio::time::timeout` around them if that matters.
#![cfg(feature = "redis")]
#![allow(dead_code, unreachable_pub)]

use std::{
    collections::BTreeMap,
    env,
    ffi::{OsStr, OsString},
    fs::{self, File},
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{self, Child, Command, Stdio},
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

/// Environment variable naming the `redis-server` binary to run.
pub const BIN_ENV: &str = "REDIS_SERVER_BIN";

/// How long `start` and `restart` wait for the server to answer `PING`.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How many free ports `start` tries when the chosen one is taken before redis binds it.
const PORT_ATTEMPTS: usize = 5;

/// Pause between two readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// How long `pause` and `resume` wait for the kernel to report the new process state.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Lines of the server log shown in failure messages.
const LOG_TAIL_LINES: usize = 25;

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
        Self::start_with(binary())
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
            let port = free_port();
            match launch(
                &bin,
                &args,
                dir.path(),
                port,
                Instant::now() + START_TIMEOUT,
            ) {
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
        report(self.dir.path(), 0)
    }

    /// A client for [`url`](Self::url); connecting is up to the caller, with redis-rs's
    /// default timeouts.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("a 127.0.0.1 redis URL is valid")
    }

    /// A fresh multiplexed connection for assertions, without connection or response
    /// timeout (see the module docs).
    ///
    /// # Panics
    ///
    /// If the server refuses the connection (for example after `kill`).
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        let config = redis::AsyncConnectionConfig::new()
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
            match launch(&self.bin, &self.args, self.dir.path(), self.port, deadline) {
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
        self.signal("-STOP");
        self.paused.store(true, Ordering::SeqCst);
        self.await_state(|state| state == 'T', "stopped");
    }

    /// Continues a paused server with SIGCONT; it answers queued requests right away.
    pub fn resume(&self) {
        self.signal("-CONT");
        self.paused.store(false, Ordering::SeqCst);
        self.await_state(|state| state != 'T', "running");
    }

    /// `CLIENT KILL TYPE pubsub` through a fresh connection: closes every connection that is
    /// subscribed to a channel or pattern. Returns how many were closed.
    pub async fn kill_pubsub_clients(&self) -> usize {
        let mut con = self.connection().await;
        redis::cmd("CLIENT")
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
        let mut con = self.connection().await;
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await
                .unwrap_or_else(|e| panic!("SCAN failed: {e}"));
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        // SCAN may return a key more than once.
        keys.sort();
        keys.dedup();

        let mut entries = Vec::with_capacity(keys.len());
        for key in keys {
            let (kind, pttl): (String, i64) = redis::pipe()
                .atomic()
                .cmd("TYPE")
                .arg(&key)
                .cmd("PTTL")
                .arg(&key)
                .query_async(&mut con)
                .await
                .unwrap_or_else(|e| panic!("TYPE/PTTL failed: {e}"));
            let value = match kind.as_str() {
                "none" => continue,
                "string" => match query::<Option<Vec<u8>>>(&mut con, "GET", &key, &[]).await {
                    Some(value) => value,
                    None => continue,
                },
                "set" => {
                    let mut members: Vec<Vec<u8>> = query(&mut con, "SMEMBERS", &key, &[]).await;
                    members.sort();
                    members.join(&b","[..])
                }
                "list" => query::<Vec<Vec<u8>>>(&mut con, "LRANGE", &key, &["0", "-1"])
                    .await
                    .join(&b","[..]),
                "zset" => query::<Vec<Vec<u8>>>(&mut con, "ZRANGE", &key, &["0", "-1"])
                    .await
                    .join(&b","[..]),
                "hash" => {
                    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> =
                        query(&mut con, "HGETALL", &key, &[]).await;
                    pairs.sort();
                    pairs
                        .into_iter()
                        .map(|(field, value)| [field, value].join(&b"="[..]))
                        .collect::<Vec<_>>()
                        .join(&b","[..])
                }
                other => format!("<{other}>").into_bytes(),
            };
            entries.push((key, pttl, value));
        }
        entries
    }

    /// `INFO commandstats` as command name -> calls, names lowercase as Redis reports them
    /// (`set`, `client|kill`). Counts include the harness's own commands: `ping` and `info`
    /// from each readiness probe, and those of earlier `dump` / `command_stats` calls (this
    /// call's `INFO` is counted only from the next call on). `restart` resets them.
    pub async fn command_stats(&self) -> BTreeMap<String, u64> {
        let mut con = self.connection().await;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut con)
            .await
            .unwrap_or_else(|e| panic!("INFO commandstats failed: {e}"));
        info.lines()
            .filter_map(|line| {
                // cmdstat_set:calls=3,usec=12,usec_per_call=4.00,rejected_calls=0,failed_calls=0
                let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = fields
                    .split(',')
                    .find_map(|field| field.strip_prefix("calls="))?
                    .parse()
                    .ok()?;
                Some((name.to_owned(), calls))
            })
            .collect()
    }

    /// Sends `sig` (`-STOP`, `-CONT`) with the `kill` command.
    fn signal(&self, sig: &str) {
        let pid = self.running_pid();
        let status = Command::new("kill")
            .arg(sig)
            .arg(pid.to_string())
            .status()
            .unwrap_or_else(|e| panic!("cannot run `kill {sig} {pid}`: {e}"));
        assert!(status.success(), "`kill {sig} {pid}` failed: {status}");
    }

    /// Waits until `/proc/<pid>/stat` shows a state accepted by `want` (Linux; elsewhere
    /// the signal is trusted to have landed).
    fn await_state(&self, want: impl Fn(char) -> bool, what: &str) {
        let pid = self.running_pid();
        let stat = PathBuf::from(format!("/proc/{pid}/stat"));
        let deadline = Instant::now() + SIGNAL_TIMEOUT;
        loop {
            let Ok(text) = fs::read_to_string(&stat) else {
                return;
            };
            // "<pid> (<comm>) <state> ..."; comm may contain spaces and parentheses.
            let state = text
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            if state.is_some_and(&want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server {pid} is not {what} after {SIGNAL_TIMEOUT:?} (state {state:?})"
            );
            thread::sleep(Duration::from_millis(1));
        }
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

/// Outcome of one attempt to run redis on a port.
enum Launch {
    /// It answers `PING` on the port, and it is our process that answers.
    Ready(Child),
    /// It exited because the port was taken; carries the log tail.
    PortTaken(String),
}

/// Runs the server on `port` and waits until it answers, it exits, or `deadline` passes.
fn launch(bin: &OsStr, args: &[OsString], dir: &Path, port: u16, deadline: Instant) -> Launch {
    let log = dir.join("redis.log");
    // Redis appends to its log; remember where this run starts.
    let log_from = fs::metadata(&log).map_or(0, |meta| meta.len());
    // Anything redis prints before it opens its log file (bad arguments) lands here.
    let stdio = File::create(dir.join("stdio.log"))
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.join("stdio.log").display()));
    let stderr = stdio.try_clone().expect("clone of a file handle");

    let spawned = Command::new(bin)
        .args(args)
        .arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(stdio)
        .stderr(stderr)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
            "cannot start `{}`: binary not found. The Redis tests start their own server: \
             install it (`apt-get install redis-server` on Debian/Ubuntu, `brew install redis` \
             on macOS) or set {BIN_ENV} to the path of a redis-server binary.",
            bin.to_string_lossy()
        ),
        Err(e) => panic!("cannot start `{}`: {e}", bin.to_string_lossy()),
    };

    loop {
        match child.try_wait() {
            Ok(None) => {}
            Ok(Some(status)) => {
                let report = report(dir, log_from);
                if report.contains("Address already in use") {
                    return Launch::PortTaken(report);
                }
                panic!(
                    "redis-server exited ({status}) before answering PING on 127.0.0.1:{port}; log:\n{report}"
                );
            }
            Err(e) => panic!("cannot poll redis-server {}: {e}", child.id()),
        }
        if answers_ping(port, child.id()) {
            return Launch::Ready(child);
        }
        if Instant::now() >= deadline {
            let pid = child.id();
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "redis-server {pid} did not answer PING on 127.0.0.1:{port} within {START_TIMEOUT:?}; log:\n{}",
                report(dir, log_from)
            );
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Whether the server on `port` answers `PING` and is process `pid` (another test's server
/// could hold the port while ours is about to fail with "Address already in use").
fn answers_ping(port: u16, pid: u32) -> bool {
    let probe = || -> io::Result<bool> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        stream.set_read_timeout(Some(Duration::from_millis(500)))?;
        stream.set_write_timeout(Some(Duration::from_millis(500)))?;
        (&stream).write_all(b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")?;

        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line != "+PONG\r\n" {
            // For example `-LOADING`: not ready yet.
            return Ok(false);
        }
        line.clear();
        reader.read_line(&mut line)?;
        let Some(len) = line
            .strip_prefix('$')
            .and_then(|len| len.trim_end().parse::<usize>().ok())
        else {
            return Ok(false);
        };
        let mut info = vec![0; len + 2];
        reader.read_exact(&mut info)?;
        let wanted = format!("process_id:{pid}");
        Ok(String::from_utf8_lossy(&info).lines().any(|l| l == wanted))
    };
    probe().unwrap_or(false)
}

/// One command with a key and literal arguments, panicking on error.
async fn query<T: redis::FromRedisValue>(
    con: &mut redis::aio::MultiplexedConnection,
    name: &str,
    key: &[u8],
    args: &[&str],
) -> T {
    redis::cmd(name)
        .arg(key)
        .arg(args)
        .query_async(con)
        .await
        .unwrap_or_else(|e| panic!("{name} failed: {e}"))
}

/// The last lines of the log written from byte `log_from` on, and anything redis printed
/// to stdout/stderr.
fn report(dir: &Path, log_from: u64) -> String {
    let log = dir.join("redis.log");
    let mut text = String::new();
    match File::open(&log).and_then(|mut file| {
        file.seek(SeekFrom::Start(log_from))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(bytes)
    }) {
        Ok(bytes) => {
            let lossy = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = lossy.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            text.push_str(&tail.join("\n"));
        }
        Err(e) => text.push_str(&format!("(no log at {}: {e})", log.display())),
    }
    if let Ok(stdio) = fs::read_to_string(dir.join("stdio.log"))
        && !stdio.trim().is_empty()
    {
        text.push_str("\n--- stdout/stderr ---\n");
        text.push_str(stdio.trim_end());
    }
    text
}

/// A blocking connection to `127.0.0.1:port` with 2 s connect, read and write timeouts (for
/// harness code that polls a server's state, such as the cluster and sentinel harnesses).
pub fn blocking_connection(port: u16) -> redis::RedisResult<redis::Connection> {
    let timeout = Duration::from_secs(2);
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let con = client.get_connection_with_timeout(timeout)?;
    con.set_read_timeout(Some(timeout))?;
    con.set_write_timeout(Some(timeout))?;
    Ok(con)
}

/// The `name:value` lines of an `INFO` (or `CLUSTER INFO`) reply.
pub fn parse_info(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_owned(), value.trim_end().to_owned()))
        .collect()
}

/// Calls `probe` every `interval` until it returns `Ok`, for at most `timeout`. On time-out,
/// returns the last `Err` (what was still missing).
pub fn poll<T>(
    timeout: Duration,
    interval: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(value) => return Ok(value),
            Err(missing) if Instant::now() >= deadline => return Err(missing),
            Err(_) => thread::sleep(interval),
        }
    }
}

/// `$REDIS_SERVER_BIN` if set and non-empty, else `redis-server`.
pub fn binary() -> OsString {
    env::var_os(BIN_ENV)
        .filter(|bin| !bin.is_empty())
        .unwrap_or_else(|| "redis-server".into())
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0 to find a free port: {e}"))
}

/// `$TMPDIR/rc-redis-<pid>-<n>`, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty directory.
    pub fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = env::temp_dir().join(format!("rc-redis-{}-{n}", process::id()));
        // A leftover from an earlier process that had the same pid.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self(path)
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
