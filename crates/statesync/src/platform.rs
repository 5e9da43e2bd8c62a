//! What differs between platforms, in one place: the default endpoint and
//! listening on it, file privacy, the shutdown signal, and stopping a child
//! process.
//!
//! On Unix a hub listens on `hub.sock` in its data directory (mode `0600`);
//! elsewhere (Windows) on a named pipe whose name is derived from the data
//! directory, so `get`, `set` and `watch` find it from the same
//! `--data-dir` without further flags.

use std::io;
use std::path::Path;

use state_sync_net::{Endpoint, Server};
use tokio::process::Child;

/// The endpoint a hub on `data_dir` listens on unless told otherwise.
pub(crate) fn default_endpoint(data_dir: &Path) -> Endpoint {
    Endpoint::in_data_dir(data_dir)
}

/// Creates the data directory and its missing parents, `0700` on Unix
/// (the hub's socket lives there), when no file store creates it.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Whether users other than the owner may read `path` (Unix mode bits; on
/// other platforms files are private to their user by default: `false`).
pub(crate) fn readable_by_others(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o044 != 0)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

/// Listens on a Unix socket or a named local socket.
///
/// # Errors
///
/// When binding fails, or a Unix socket is asked for where there is none.
pub(crate) async fn listen(server: &Server, endpoint: &Endpoint) -> io::Result<()> {
    match endpoint {
        #[cfg(unix)]
        Endpoint::Unix(path) => server.listen_unix(path).await.map(drop),
        #[cfg(not(unix))]
        Endpoint::Unix(_) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "Unix sockets are not available on this platform; use --local NAME",
        )),
        Endpoint::Local(name) => server.listen_local(name).await.map(drop),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a local endpoint: {other}"),
        )),
    }
}

/// Waits for Ctrl-C, or on Unix SIGTERM too.
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).ok();
        let term = async {
            match term.as_mut() {
                Some(term) => drop(term.recv().await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = term => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Asks a child to stop (SIGTERM on Unix, through `kill(1)`) and waits up to
/// 5 s; kills it if it does not stop. Elsewhere there is no portable
/// graceful stop for a console process: it is killed.
pub(crate) async fn terminate(child: &mut Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id() {
        let _ = tokio::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(std::time::Duration::from_secs(5), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_endpoint_is_a_socket_in_the_data_directory_or_a_pipe_named_after_it() {
        let a = default_endpoint(Path::new("/data/a"));
        let b = default_endpoint(Path::new("/data/b"));
        assert_ne!(a.to_string(), b.to_string());
        assert_eq!(
            a.to_string(),
            default_endpoint(Path::new("/data/a")).to_string()
        );
        if cfg!(unix) {
            assert!(matches!(a, Endpoint::Unix(p) if p == Path::new("/data/a/hub.sock")));
        }
    }
}
