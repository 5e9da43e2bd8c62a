//! [`Endpoint`]: where a hub listens, and where `statesync serve` listens by
//! default.

use std::fmt;
use std::path::PathBuf;

/// Where a hub listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket path (Unix only).
    Unix(PathBuf),
    /// A named local socket (see `Server::listen_local`): a named pipe on
    /// Windows, an abstract-namespace socket on Linux.
    Local(String),
    /// A WebSocket URL, e.g. `ws://127.0.0.1:7700`.
    WebSocket(String),
}

impl Endpoint {
    /// The data directory `statesync serve` uses by default: `state-sync`
    /// under the user's data directory (`~/.local/share` on Linux,
    /// `~/Library/Application Support` on macOS, `%APPDATA%` on Windows).
    #[must_use]
    pub fn default_data_dir() -> PathBuf {
        dirs::data_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("state-sync")
    }

    /// Where `statesync serve --data-dir DIR` listens: `hub.sock` in `DIR`
    /// on Unix, a named pipe named after `DIR` on Windows.
    #[must_use]
    pub fn in_data_dir(dir: impl AsRef<std::path::Path>) -> Endpoint {
        crate::platform::endpoint_in(dir.as_ref())
    }
}

/// Where `statesync serve` listens with no options: the socket of the
/// [default data directory](Endpoint::default_data_dir) (a named pipe on
/// Windows). `Client::connect(Endpoint::default(), …)` reaches it with no
/// path in the code.
impl Default for Endpoint {
    fn default() -> Self {
        Endpoint::in_data_dir(Endpoint::default_data_dir())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Local(name) => write!(f, "local:{name}"),
            Endpoint::WebSocket(url) => f.write_str(url),
        }
    }
}
