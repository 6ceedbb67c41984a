//! The built `server` binary as a child process.

use std::ffi::OsStr;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Client, Error};

/// A `server` process started from its binary on a free loopback port, killed on drop.
///
/// The binary is the caller's to name: an integration test of this crate has it as
/// `env!("CARGO_BIN_EXE_server")`.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    addr: SocketAddr,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ServerProcess {
    /// Runs `binary --addr 127.0.0.1:<free port> <args>` with `RUST_LOG=warn`, its standard
    /// output discarded and its standard error inherited.
    pub fn spawn<I, S>(binary: impl AsRef<Path>, args: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(binary.as_ref())
            .arg("--addr")
            .arg(addr.to_string())
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.as_ref().display()))?;
        Ok(Self { child, addr })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until `/healthz` answers `200` (the process is up and listening), at most
    /// `timeout`.
    pub async fn ready(&self, client: &Client, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let url = format!("{}/healthz", self.base());
        loop {
            if let Ok(reply) = client.get(&url).await
                && reply.status.is_success()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("the server on {} never became ready", self.addr).into());
            }
            // Polling a process that is still starting: nothing to be woken by.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
