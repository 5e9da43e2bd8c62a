//! A real PostgreSQL for tests (feature `testkit`): `initdb` in a temp dir
//! as the `postgres` user when run as root, `postgres` on a free loopback
//! port, stopped by PID on drop. Uses the newest server under
//! `/usr/lib/postgresql/*/bin` (Debian's layout), or the `PATH`.
#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `postgres` server child; stopped on drop.
#[derive(Debug)]
pub struct PostgresServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

fn bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin").join(name))
        .filter(|path| path.exists())
        .collect();
    versions.sort();
    versions.pop().unwrap_or_else(|| PathBuf::from(name))
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// `program` as a command, run as the `postgres` user when we are root
/// (PostgreSQL refuses to run as root). `setpriv` executes it in place, so
/// the PID is the server's own.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("setpriv");
        command
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(program);
        command
    } else {
        Command::new(program)
    }
}

impl PostgresServer {
    /// Creates a cluster and starts it.
    ///
    /// # Panics
    ///
    /// When PostgreSQL is missing or does not start within 30 s.
    pub fn start() -> PostgresServer {
        PostgresServer::start_with(&[])
    }

    /// Like [`start`](Self::start), with more server settings
    /// (`"name=value"`, each passed as `-c`), e.g.
    /// `"shared_preload_libraries=pg_stat_statements"`.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub fn start_with(settings: &[&str]) -> PostgresServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        if is_root() {
            let owner = Command::new("id")
                .args(["-u", "postgres"])
                .output()
                .expect("id");
            let uid: u32 = String::from_utf8_lossy(&owner.stdout)
                .trim()
                .parse()
                .expect("postgres uid");
            let group = Command::new("id")
                .args(["-g", "postgres"])
                .output()
                .expect("id");
            let gid: u32 = String::from_utf8_lossy(&group.stdout)
                .trim()
                .parse()
                .expect("postgres gid");
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        }
        let initdb = as_postgres(&bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["--auth=trust", "-U", "postgres", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .expect("initdb must be installed (scripts/install-deps.sh installs PostgreSQL)");
        assert!(initdb.success(), "initdb failed");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("free port")
            .port();
        let child = as_postgres(&bin("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(dir.path())
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .args(settings.iter().flat_map(|setting| ["-c", setting]))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres");
        let server = PostgresServer {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(bin("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "postgres did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// Runs `sql` with `psql` as `postgres`; its unaligned output.
    ///
    /// # Panics
    ///
    /// When `psql` cannot run or the statement fails.
    #[must_use]
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(bin("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The connection configuration.
    #[must_use]
    pub fn config(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // A fast shutdown (SIGINT); SIGKILL if it lingers.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
