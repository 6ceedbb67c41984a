//! One Redis process of a test: the binary, a free port, a directory of its own, start-up
//! until it answers `PING`, the log tail, signals. Shared by every topology.

use std::{
    collections::BTreeMap,
    env,
    ffi::{OsStr, OsString},
    fs::{self, File},
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{self, Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

/// Environment variable naming the `redis-server` binary to run.
pub const BIN_ENV: &str = "REDIS_SERVER_BIN";

/// How long a start or a restart waits for the server to answer `PING`.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between two readiness probes.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// How long `pause` and `resume` wait for the kernel to report the new process state.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Lines of the server log shown in failure messages.
const LOG_TAIL_LINES: usize = 25;

/// Outcome of one attempt to run redis on a port.
pub(crate) enum Launch {
    /// It answers `PING` on the port, and it is our process that answers.
    Ready(Child),
    /// It exited because the port was taken; carries the log tail.
    PortTaken(String),
}

/// Runs the server on `port` and waits until it answers, it exits, or `deadline` passes.
pub(crate) fn launch(
    bin: &OsStr,
    args: &[OsString],
    dir: &Path,
    port: u16,
    deadline: Instant,
) -> Launch {
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

/// The last lines of the log written from byte `log_from` on, and anything redis printed
/// to stdout/stderr.
pub(crate) fn report(dir: &Path, log_from: u64) -> String {
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

/// Sends `sig` (`-STOP`, `-CONT`) to `pid` with the `kill` command.
pub(crate) fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .status()
        .unwrap_or_else(|e| panic!("cannot run `kill {sig} {pid}`: {e}"));
    assert!(status.success(), "`kill {sig} {pid}` failed: {status}");
}

/// Waits until `/proc/<pid>/stat` shows a state accepted by `want` (Linux; elsewhere the
/// signal is trusted to have landed).
pub(crate) fn await_state(pid: u32, want: impl Fn(char) -> bool, what: &str) {
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

/// `$REDIS_SERVER_BIN` if set and non-empty, else `redis-server`.
pub(crate) fn binary() -> OsString {
    env::var_os(BIN_ENV)
        .filter(|bin| !bin.is_empty())
        .unwrap_or_else(|| "redis-server".into())
}

/// A port that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0 to find a free port: {e}"))
}

/// `$TMPDIR/rc-redis-<pid>-<n>`, removed on drop.
#[derive(Debug)]
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = env::temp_dir().join(format!("rc-redis-{}-{n}", process::id()));
        // A leftover from an earlier process that had the same pid.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A blocking connection to `127.0.0.1:port` with 2 s connect, read and write timeouts (for
/// harness code that polls a server's state, such as the cluster and Sentinel harnesses).
pub fn blocking_connection(port: u16) -> redis::RedisResult<redis::Connection> {
    let timeout = Duration::from_secs(2);
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let con = client.get_connection_with_timeout(timeout)?;
    con.set_read_timeout(Some(timeout))?;
    con.set_write_timeout(Some(timeout))?;
    Ok(con)
}

/// The `name:value` lines of an `INFO` (or `CLUSTER INFO`) reply.
pub(crate) fn parse_info(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_owned(), value.trim_end().to_owned()))
        .collect()
}

/// Calls `probe` every `interval` until it returns `Ok`, for at most `timeout`. On time-out,
/// returns the last `Err` (what was still missing).
pub(crate) fn poll<T>(
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
