//! A real `redis-server` for tests (feature `testkit`): started on a free
//! loopback port with no persistence and its data in a temp dir, stopped by
//! PID on drop. Needs `redis-server` and `redis-cli` on the `PATH`.
#![allow(clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `redis-server` child; killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one.
    ///
    /// # Panics
    ///
    /// When `redis-server` is missing or does not start within 10 s.
    pub fn start() -> RedisServer {
        RedisServer::try_start().expect("redis-server (scripts/install-deps.sh installs it)")
    }

    /// Starts one, or says why it could not.
    ///
    /// # Errors
    ///
    /// `redis-server` is not on the `PATH` (`NotFound`), or does not accept
    /// connections within 10 s (`TimedOut`).
    pub fn try_start() -> std::io::Result<RedisServer> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Self::try_spawn(port, dir.path())?;
        Ok(RedisServer { child, port, dir })
    }

    fn spawn(port: u16, dir: &std::path::Path) -> Child {
        Self::try_spawn(port, dir).expect("redis-server (scripts/install-deps.sh installs it)")
    }

    fn try_spawn(port: u16, dir: &std::path::Path) -> std::io::Result<Child> {
        let mut child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot run redis-server: {e}")))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("redis-server did not accept connections on port {port} within 10 s"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(child)
    }

    /// Its URL.
    #[must_use]
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it and starts a new one on the same port: without
    /// persistence, every record is gone.
    ///
    /// # Panics
    ///
    /// When it does not come back.
    pub fn restart(&mut self) {
        self.stop();
        self.resume();
    }

    /// Kills it (SIGKILL); [`resume`](Self::resume) starts it again.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port, empty.
    ///
    /// # Panics
    ///
    /// When it does not come back.
    pub fn resume(&mut self) {
        self.child = Self::spawn(self.port, self.dir.path());
    }

    /// Runs a command through `redis-cli`; returns what it printed.
    ///
    /// # Panics
    ///
    /// When `redis-cli` is missing.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis test server");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
