//! Unix sockets, the one platform-specific transport, and where a hub
//! listens by default, in one place. Named local sockets (Windows named
//! pipes, abstract sockets on Linux) go through `interprocess` and are
//! portable.

use std::path::Path;

use crate::Endpoint;

/// The endpoint of a hub on `data_dir`: `hub.sock` in it on Unix; on
/// Windows, the named pipe `state-sync-<crc32 of the directory>`, so the
/// hub and its clients find each other from the same directory.
pub(crate) fn endpoint_in(data_dir: &Path) -> Endpoint {
    if cfg!(unix) {
        Endpoint::Unix(data_dir.join("hub.sock"))
    } else {
        let path = data_dir.to_string_lossy();
        Endpoint::Local(format!(
            "state-sync-{:08x}",
            crc32fast::hash(path.as_bytes())
        ))
    }
}

#[cfg(unix)]
pub(crate) use unix::{bind_unix, connect_unix};

#[cfg(unix)]
mod unix {
    use std::io;
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    use std::path::Path;

    use tokio::net::{UnixListener, UnixStream};

    /// Binds a Unix socket at `path` that only this user can connect to.
    ///
    /// The socket is bound inside a fresh `0700` directory, made `0600`, and
    /// only then renamed into place: it is never reachable by others, not
    /// even between `bind` and `chmod`. A stale socket file (nobody
    /// listening) is replaced; a live one is `AddrInUse`.
    pub(crate) async fn bind_unix(path: &Path) -> io::Result<UnixListener> {
        if path.exists() {
            if UnixStream::connect(path).await.is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("a server is already listening at {}", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "a socket path needs a file name",
            )
        })?;
        let mut private = name.to_owned();
        private.push(format!(".{}.bind", std::process::id()));
        let private = parent.join(private);
        std::fs::DirBuilder::new().mode(0o700).create(&private)?;
        let bound = (|| {
            let inner = private.join("s");
            let listener = UnixListener::bind(&inner)?;
            std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&inner, path)?;
            Ok(listener)
        })();
        let _ = std::fs::remove_dir_all(&private);
        bound
    }

    /// Connects to a Unix socket.
    pub(crate) async fn connect_unix(
        path: &Path,
    ) -> io::Result<(
        tokio::net::unix::OwnedReadHalf,
        tokio::net::unix::OwnedWriteHalf,
    )> {
        Ok(UnixStream::connect(path).await?.into_split())
    }
}
